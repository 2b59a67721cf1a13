"""Small factories for marketplace tests. Ledger state is always built with the real services."""

from __future__ import annotations

import itertools
from typing import Any

from marketplace.accounts.models import User
from marketplace.accounts.services import user_create
from marketplace.ledger.models import Account
from marketplace.ledger.services import credit_grant, earnings_account_create, wallet_get_or_create

_seq = itertools.count(1)


def make_user(**overrides: Any) -> User:
    fields: dict[str, Any] = {"username": f"user{next(_seq)}", "password": None}
    fields.update(overrides)
    return user_create(**fields)


def make_wallet(*, user: User | None = None, credits: int = 0) -> Account:
    """A user's wallet, granted ``credits`` micro-credits."""
    wallet = wallet_get_or_create(user=user or make_user())
    if credits:
        credit_grant(account=wallet, amount=credits, memo="test funds")
        wallet.refresh_from_db()
    return wallet


def make_earnings(*, user: User | None = None) -> Account:
    return earnings_account_create(user=user or make_user(), label="test earnings")
