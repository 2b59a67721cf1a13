from typing import Any

from django.apps import AppConfig, apps
from django.db.models.signals import post_migrate


def _cache_table_create(using: str = "default", **kwargs: Any) -> None:
    """The database cache's table (the embedded default's shared cache: throttles, login
    lockouts) comes with every ``migrate``; a no-op where the cache is Redis or already there."""
    from django.core.management import call_command

    call_command("createcachetable", database=using, verbosity=0)


class WebConfig(AppConfig):
    """Server-rendered pages: the public marketplace, the client's wallet, jobs and keys, staff views."""

    name = "marketplace.web"
    label = "web"
    verbose_name = "web pages"

    def ready(self) -> None:
        # Sent per migrated app with models; this app has none, accounts (which uses the cache) does.
        post_migrate.connect(_cache_table_create, sender=apps.get_app_config("accounts"))
