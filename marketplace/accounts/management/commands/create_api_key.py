"""``hivemart-market create_api_key USERNAME [--create] [--staff] [--name N]``: print a new API key."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.accounts.models import User
from marketplace.accounts.services import api_key_create, user_create
from marketplace.common.errors import ApplicationError


class Command(BaseCommand):
    help = "Create an API key for a user and print it (the only time it is shown)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label for the key")
        parser.add_argument("--create", action="store_true", help="create the user (API-only, no password) if missing")
        parser.add_argument("--staff", action="store_true", help="with --create: make the new user staff")

    def handle(self, *args: Any, username: str, name: str, create: bool, staff: bool, **options: Any) -> None:
        try:
            user = User.objects.filter(username=username).first()
            if user is None:
                if not create:
                    raise CommandError(f"no user {username!r} (add --create to create one)")
                user = user_create(username=username, is_staff=staff)
            created = api_key_create(user=user, name=name)
        except ApplicationError as e:
            raise CommandError(e.message) from None
        self.stdout.write(created.raw)
