"""Small factories for marketplace tests. Ledger state is always built with the real services."""

from __future__ import annotations

import itertools
from typing import Any

from hivemart_core.protocol.identity import Identity
from marketplace.accounts.models import User
from marketplace.accounts.services import user_create
from marketplace.catalog.models import CatalogModel
from marketplace.catalog.services import catalog_model_create
from marketplace.ledger.models import Account
from marketplace.ledger.services import credit_grant, earnings_account_create, wallet_get_or_create
from marketplace.providers.models import Provider
from marketplace.providers.services import (
    OfferSpec,
    challenge_issue,
    provider_heartbeat,
    provider_register,
    registration_message,
)

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


def digest(n: int) -> str:
    """A well-formed (fake) sha256 hex digest."""
    return f"{n:064x}"


def make_model(**overrides: Any) -> CatalogModel:
    n = next(_seq)
    fields: dict[str, Any] = dict(
        model_id=f"llama-4x64-{n:012x}",
        arch="llama",
        num_blocks=4,
        hidden_size=64,
        dtype="float32",
        weights_digest=digest(n),
    )
    fields.update(overrides)
    fields.setdefault("block_digests", [digest(1000 * n + i) for i in range(fields["num_blocks"])])
    return catalog_model_create(**fields)


def register(
    *,
    user: User,
    identity: Identity,
    model: CatalogModel,
    start: int = 0,
    end: int | None = None,
    price: int = 1_000,
    **fields: Any,
) -> Provider:
    """Register ``identity`` as a provider the way an agent does: challenge, sign, register."""
    challenge = challenge_issue(user=user).nonce
    provider, _ = provider_register(
        user=user,
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        challenge=challenge,
        signature=identity.sign(registration_message(challenge)),
        offer=OfferSpec(
            model=model, block_start=start, block_end=model.num_blocks if end is None else end, price=price
        ),
        **fields,
    )
    return provider


def make_provider(
    *, model: CatalogModel | None = None, user: User | None = None, online: bool = True, **overrides: Any
) -> Provider:
    """A registered provider (online unless ``online=False``) with a fresh identity."""
    provider = register(
        user=user or make_user(), identity=Identity.generate(), model=model or make_model(), **overrides
    )
    if online:
        provider = provider_heartbeat(provider=provider, state="online", throughput=1000.0, latency_ms=20.0)
    return provider
