"""``hivemart-market``: Django's manage.py for the marketplace (``hivemart-market migrate``, ...)."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; runs a Django management command."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    try:
        import django  # noqa: F401 - only to learn whether the marketplace's extra is installed
    except ImportError:
        # `pip install hivemart` (the SDK) installs this command too, without the server stack.
        sys.stderr.write("Error: hivemart-market needs the marketplace's packages: pip install 'hivemart[market]'\n")
        sys.exit(2)
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    argv = argv if argv is not None else sys.argv
    if len(argv) > 1 and argv[1] not in ("help", "-h", "--help", "--version", "version"):
        from django.conf import settings

        try:
            settings.INSTALLED_APPS  # noqa: B018 - reads the settings: a missing SECRET_KEY, a bad DATABASE_URL, ...
        except ImproperlyConfigured as e:
            sys.stderr.write(
                f"Error: {e}; hivemart-market takes its settings from environment variables (docs/operators.md)\n"
            )
            sys.exit(2)
    execute_from_command_line(argv)


if __name__ == "__main__":
    main()
