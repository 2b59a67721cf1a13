"""``python -m client_sdk``: the ``hivemart`` command line."""

from client_sdk.cli import main

main()
