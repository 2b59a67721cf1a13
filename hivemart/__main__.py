"""``python -m hivemart``: the ``hivemart`` command line."""

from hivemart.cli import main

main()
