"""Writes for providers: registration by signed challenge, heartbeats, offers, measurements.

Registration proves key ownership. The provider asks for a challenge (32 random bytes,
sent as 64 hex characters, single use, valid ``HIVEMART_CHALLENGE_TTL_S`` seconds) and signs,
with the Ed25519 key that is also its libp2p identity, exactly these bytes::

    b"hivemart-register:" + bytes.fromhex(challenge)

(18 ASCII bytes, then the 32 raw nonce bytes; :func:`registration_message`). The server
checks the signature against the submitted public key, and that the submitted peer id is the
one derived from that key (``hivemart_core.protocol.identity.peer_id_from_public_key``), so
nobody can register a peer id whose key they do not hold.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.identity import check_public_key, peer_id_from_public_key, verify_signature
from marketplace.accounts.models import User
from marketplace.catalog.models import CatalogModel
from marketplace.common.errors import Conflict, PermissionDenied, ValidationFailed
from marketplace.ledger.services import MAX_AMOUNT, earnings_account_create
from marketplace.providers.models import Provider, ProviderEvent, ProviderMeasurement, RegistrationChallenge

REGISTRATION_PREFIX = b"hivemart-register:"
MAX_PRICE = MAX_AMOUNT
MAX_GPU_MEMORY_MB = 10**7
_PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{1,128}$")  # base58btc
_NONCE_RE = re.compile(r"^[0-9a-f]{64}$")
_REGION_RE = re.compile(r"^[A-Za-z0-9_-]{0,32}$")
# Heartbeats may set these; "offline" is how an agent says goodbye.
HEARTBEAT_STATES = (Provider.State.JOINING, Provider.State.ONLINE, Provider.State.DRAINING, Provider.State.OFFLINE)


def registration_message(challenge: str) -> bytes:
    """The exact bytes a provider signs to answer ``challenge`` (64 hex characters)."""
    return REGISTRATION_PREFIX + bytes.fromhex(challenge)


@dataclass(frozen=True)
class OfferSpec:
    """What a provider sells: used by the registration and offer-update services."""

    model: CatalogModel
    block_start: int
    block_end: int
    price: int


def _event(
    provider: Provider, kind: str, *, now: datetime, from_state: str = "", to_state: str = "", reason: str = ""
) -> None:
    ProviderEvent.objects.create(
        provider=provider, kind=kind, from_state=from_state, to_state=to_state, reason=reason[:200], at=now
    )


def _check_int(field: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValidationFailed(f"{field} is an integer between {low} and {high}", extra={"field": field})
    return value


def _check_figure(field: str, value: object, high: float = 1e15) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= high
    ):
        raise ValidationFailed(f"{field} is a finite number between 0 and {high:g}", extra={"field": field})
    return float(value)


def _check_offer(offer: OfferSpec) -> None:
    if not offer.model.active:
        raise ValidationFailed(f"{offer.model.model_id} is withdrawn from the catalog", extra={"field": "model"})
    _check_int("block_start", offer.block_start, 0, offer.model.num_blocks - 1)
    _check_int("block_end", offer.block_end, offer.block_start + 1, offer.model.num_blocks)
    _check_int("price", offer.price, 0, MAX_PRICE)


def _check_text(field: str, value: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValidationFailed(f"{field} is a string of at most {limit} characters", extra={"field": field})
    return value


def challenge_issue(*, user: User, now: datetime | None = None) -> RegistrationChallenge:
    """A fresh single-use registration challenge for ``user``."""
    now = now or timezone.now()
    # Forget this user's stale challenges so the table stays small.
    RegistrationChallenge.objects.filter(user=user, expires_at__lt=now).delete()
    return RegistrationChallenge.objects.create(
        user=user, nonce=secrets.token_hex(32), expires_at=now + timedelta(seconds=settings.HIVEMART_CHALLENGE_TTL_S)
    )


def _challenge_consume(*, user: User, nonce: str, now: datetime) -> None:
    """Use up the challenge, committed even if the registration then fails: one attempt per challenge."""
    if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
        raise ValidationFailed(
            "a challenge is 64 lowercase hex characters", extra={"field": "challenge"}, code="invalid_challenge"
        )
    with transaction.atomic():
        challenge = RegistrationChallenge.objects.select_for_update().filter(user=user, nonce=nonce).first()
        if challenge is None or challenge.used_at is not None or challenge.expires_at < now:
            raise ValidationFailed(
                "unknown, used or expired challenge; ask for a new one",
                extra={"field": "challenge"},
                code="invalid_challenge",
            )
        challenge.used_at = now
        challenge.save(update_fields=["used_at"])


def provider_register(
    *,
    user: User,
    peer_id: str,
    public_key: bytes,
    challenge: str,
    signature: bytes,
    offer: OfferSpec,
    name: str = "",
    gpu: str = "",
    gpu_memory_mb: int = 0,
    region: str = "",
    now: datetime | None = None,
) -> tuple[Provider, bool]:
    """Register (or re-register) the provider ``peer_id`` for ``user``; returns (provider, created).

    Re-registering a peer id one already owns (an agent restarting, perhaps with a new span or
    price) updates it and puts it back to ``joining``; a peer id owned by someone else is a
    Conflict, even with a valid signature.
    """
    now = now or timezone.now()
    if not isinstance(peer_id, str) or not _PEER_ID_RE.match(peer_id):
        raise ValidationFailed("a peer id is base58btc text of up to 128 characters", extra={"field": "peer_id"})
    try:
        check_public_key(public_key)
    except ProtocolError as e:
        raise ValidationFailed(
            f"{e}; generate a fresh identity (delete the agent's key file)", extra={"field": "public_key"}
        ) from None
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise ValidationFailed("an Ed25519 signature has 64 bytes", extra={"field": "signature"})
    _check_offer(offer)
    _check_text("name", name, 100)
    _check_text("gpu", gpu, 100)
    if not isinstance(region, str) or not _REGION_RE.match(region):
        raise ValidationFailed("a region has at most 32 letters, digits, - or _", extra={"field": "region"})
    _check_int("gpu_memory_mb", gpu_memory_mb, 0, MAX_GPU_MEMORY_MB)
    try:
        derived = peer_id_from_public_key(public_key)
    except ProtocolError as e:
        raise ValidationFailed(str(e), extra={"field": "public_key"}) from None

    _challenge_consume(user=user, nonce=challenge, now=now)
    if derived != peer_id:
        raise PermissionDenied(
            "the peer id is not derived from this public key",
            extra={"field": "peer_id", "expected": derived},
            code="peer_id_mismatch",
        )
    if not verify_signature(public_key, registration_message(challenge), signature):
        raise PermissionDenied(
            "the signature does not verify: sign b'hivemart-register:' + the challenge bytes",
            extra={"field": "signature"},
            code="invalid_signature",
        )

    with transaction.atomic():
        provider = Provider.objects.select_for_update().filter(peer_id=peer_id).first()
        fields = dict(
            public_key=public_key.hex(),
            name=name,
            gpu=gpu,
            gpu_memory_mb=gpu_memory_mb,
            region=region,
            model=offer.model,
            block_start=offer.block_start,
            block_end=offer.block_end,
            price=offer.price,
        )
        if provider is not None:
            if provider.user_id != user.pk:
                raise Conflict("this peer id is registered by another user", extra={"peer_id": peer_id})
            previous_state = provider.state
            for key, value in fields.items():
                setattr(provider, key, value)
            provider.state, provider.last_heartbeat_at = Provider.State.JOINING, now
            provider.save()
            _event(
                provider, ProviderEvent.Kind.REREGISTERED, now=now, from_state=previous_state, to_state=provider.state
            )
            return provider, False
        earnings = earnings_account_create(user=user, label=f"earnings of provider {peer_id}")
        provider = Provider.objects.create(
            user=user,
            peer_id=peer_id,
            earnings_account=earnings,
            state=Provider.State.JOINING,
            last_heartbeat_at=now,
            **fields,
        )
        _event(provider, ProviderEvent.Kind.REGISTERED, now=now, to_state=provider.state)
        return provider, True


@transaction.atomic
def provider_heartbeat(
    *,
    provider: Provider,
    state: str,
    throughput: float | None = None,
    latency_ms: float | None = None,
    now: datetime | None = None,
) -> Provider:
    """Record a heartbeat: the provider is alive, in ``state``, with these self-reported figures."""
    now = now or timezone.now()
    if state not in HEARTBEAT_STATES:
        raise ValidationFailed(f"state is one of {', '.join(HEARTBEAT_STATES)}", extra={"field": "state"})
    throughput = _check_figure("throughput", throughput)
    latency_ms = _check_figure("latency_ms", latency_ms, high=1e9)
    provider = Provider.objects.select_for_update().get(pk=provider.pk)
    if provider.state != state:
        _event(
            provider, ProviderEvent.Kind.STATE, now=now, from_state=provider.state, to_state=state, reason="heartbeat"
        )
    provider.state, provider.last_heartbeat_at = state, now
    if throughput is not None:
        provider.reported_throughput = throughput
    if latency_ms is not None:
        provider.reported_latency_ms = latency_ms
    provider.save(
        update_fields=["state", "last_heartbeat_at", "reported_throughput", "reported_latency_ms", "updated_at"]
    )
    return provider


@transaction.atomic
def provider_offer_update(*, provider: Provider, offer: OfferSpec, now: datetime | None = None) -> Provider:
    """Change what a provider sells (model, span, price). Plans already stored keep their prices."""
    now = now or timezone.now()
    _check_offer(offer)
    provider = Provider.objects.select_for_update().get(pk=provider.pk)
    provider.model, provider.block_start, provider.block_end, provider.price = (
        offer.model,
        offer.block_start,
        offer.block_end,
        offer.price,
    )
    provider.save(update_fields=["model", "block_start", "block_end", "price", "updated_at"])
    _event(
        provider,
        ProviderEvent.Kind.OFFER,
        now=now,
        reason=f"{offer.model.model_id}[{offer.block_start}:{offer.block_end}] at {offer.price}",
    )
    return provider


@transaction.atomic
def provider_measurement_record(
    *,
    provider: Provider,
    throughput: float,
    latency_ms: float,
    success_rate: float,
    samples: int = 1,
    measured_at: datetime | None = None,
) -> ProviderMeasurement:
    """Store figures the scheduler measured; from now on they, not the self-reported ones, count.

    A measurement older than the provider's latest one is kept in the history but does not
    replace the latest (probes may finish out of order).
    """
    measured_at = measured_at or timezone.now()
    throughput = _check_figure("throughput", throughput)
    latency_ms = _check_figure("latency_ms", latency_ms, high=1e9)
    success_rate = _check_figure("success_rate", success_rate, high=1.0)
    if throughput is None or latency_ms is None or success_rate is None:
        raise ValidationFailed("a measurement needs throughput, latency_ms and success_rate")
    _check_int("samples", samples, 1, 10**9)
    provider = Provider.objects.select_for_update(of=("self",)).select_related("latest_measurement").get(pk=provider.pk)
    measurement = ProviderMeasurement.objects.create(
        provider=provider,
        throughput=throughput,
        latency_ms=latency_ms,
        success_rate=success_rate,
        samples=samples,
        measured_at=measured_at,
    )
    latest = provider.latest_measurement
    if latest is None or latest.measured_at <= measured_at:
        provider.latest_measurement = measurement
        provider.save(update_fields=["latest_measurement", "updated_at"])
    return measurement


@transaction.atomic
def providers_mark_stale(*, now: datetime | None = None) -> int:
    """Mark offline every provider whose last heartbeat is older than ``HIVEMART_HEARTBEAT_TIMEOUT_S``.

    Idempotent (offline providers are left alone); returns how many were marked.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.HIVEMART_HEARTBEAT_TIMEOUT_S)
    stale = list(
        Provider.objects.select_for_update()
        .exclude(state=Provider.State.OFFLINE)
        .filter(last_heartbeat_at__lt=cutoff)
        .order_by("pk")
        .values_list("pk", "state")
    )
    if not stale:
        return 0
    Provider.objects.filter(pk__in=[pk for pk, _ in stale]).update(state=Provider.State.OFFLINE, updated_at=now)
    ProviderEvent.objects.bulk_create(
        ProviderEvent(
            provider_id=pk,
            kind=ProviderEvent.Kind.STATE,
            from_state=state,
            to_state=Provider.State.OFFLINE,
            reason="missed heartbeats",
            at=now,
        )
        for pk, state in stale
    )
    return len(stale)


@transaction.atomic
def provider_suspend(*, provider: Provider, reason: str, now: datetime | None = None) -> Provider:
    """Take a provider out of matching (an audit caught it, or staff decided); idempotent."""
    now = now or timezone.now()
    provider = Provider.objects.select_for_update().get(pk=provider.pk)
    if provider.suspended_at is None:
        provider.suspended_at, provider.suspension_reason = now, reason[:200]
        provider.save(update_fields=["suspended_at", "suspension_reason", "updated_at"])
        _event(provider, ProviderEvent.Kind.SUSPENDED, now=now, reason=reason)
    return provider


@transaction.atomic
def provider_reputation_lower(*, provider: Provider, by: int) -> Provider:
    """Lower a provider's reputation by ``by`` points (not below 0), under its row lock."""
    if not isinstance(by, int) or isinstance(by, bool) or by < 0:
        raise ValidationFailed("a reputation penalty is a non-negative integer", extra={"field": "by"})
    provider = Provider.objects.select_for_update().get(pk=provider.pk)
    provider.reputation = max(0, provider.reputation - by)
    provider.save(update_fields=["reputation", "updated_at"])
    return provider


@transaction.atomic
def provider_reinstate(*, provider: Provider, reason: str = "", now: datetime | None = None) -> Provider:
    now = now or timezone.now()
    provider = Provider.objects.select_for_update().get(pk=provider.pk)
    if provider.suspended_at is not None:
        provider.suspended_at, provider.suspension_reason = None, ""
        provider.save(update_fields=["suspended_at", "suspension_reason", "updated_at"])
        _event(provider, ProviderEvent.Kind.REINSTATED, now=now, reason=reason)
    return provider
