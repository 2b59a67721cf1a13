"""``hivemart-market grant_credits USERNAME AMOUNT``: staff top-up from the command line."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.accounts.models import User
from marketplace.common.errors import ApplicationError
from marketplace.ledger.services import credit_grant, wallet_get_or_create


class Command(BaseCommand):
    help = "Grant AMOUNT micro-credits to USERNAME's wallet (from the external account)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("amount", type=int, help="micro-credits (1 credit = 1,000,000)")
        parser.add_argument("--memo", default="granted from the command line")
        parser.add_argument("--idempotency-key", default=None, help="grant at most once under this key")

    def handle(
        self, *args: Any, username: str, amount: int, memo: str, idempotency_key: str | None, **options: Any
    ) -> None:
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        wallet = wallet_get_or_create(user=user)
        try:
            credit_grant(account=wallet, amount=amount, memo=memo, idempotency_key=idempotency_key)
        except ApplicationError as e:
            raise CommandError(e.message) from None
        wallet.refresh_from_db()
        self.stdout.write(f"{username}: {wallet.balance} micro-credits")
