"""Catalog and provider services: registration by signed challenge, heartbeats, measurements, staleness."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from hivemart_core.protocol.identity import Identity
from marketplace.catalog.models import BlockDigest
from marketplace.catalog.selectors import catalog_model_for_use
from marketplace.catalog.services import catalog_model_set_active
from marketplace.common.errors import Conflict, PermissionDenied, ValidationFailed
from marketplace.ledger.models import Account
from marketplace.providers.models import Provider, ProviderEvent, RegistrationChallenge
from marketplace.providers.selectors import offers_for_model
from marketplace.providers.services import (
    OfferSpec,
    challenge_issue,
    provider_heartbeat,
    provider_measurement_record,
    provider_offer_update,
    provider_register,
    provider_suspend,
    providers_mark_stale,
    registration_message,
)
from tests.marketplace.factories import digest, make_model, make_provider, make_user, register

pytestmark = pytest.mark.django_db


# --- catalog ------------------------------------------------------------------------------


def test_catalog_stores_per_block_digests() -> None:
    model = make_model(num_blocks=3)
    assert list(BlockDigest.objects.filter(model=model).values_list("index", flat=True)) == [0, 1, 2]
    assert catalog_model_for_use(model_id=model.model_id) == model


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(model_id="has space"), "model_id"),
        (dict(model_id="x" * 129), "model_id"),
        (dict(arch="Llama!"), "arch"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(hidden_size=-1), "hidden_size"),
        (dict(dtype="int8"), "dtype"),
        (dict(weights_digest="abc"), "weights_digest"),
        (dict(weights_digest="A" * 64), "weights_digest"),
        (dict(num_blocks=2, block_digests=[digest(1)]), "block_digests"),
        (dict(num_blocks=2, block_digests=[digest(1), "zz"]), "block_digests"),
    ],
)
def test_catalog_rejects_bad_descriptions(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationFailed) as e:
        make_model(**overrides)
    assert e.value.extra["field"] == field


def test_catalog_model_ids_are_unique() -> None:
    model = make_model()
    with pytest.raises(Conflict):
        make_model(model_id=model.model_id)


def test_withdrawn_models_cannot_be_used() -> None:
    model = catalog_model_set_active(model=make_model(), active=False)
    with pytest.raises(ValidationFailed):
        catalog_model_for_use(model_id=model.model_id)
    with pytest.raises(ValidationFailed):
        catalog_model_for_use(model_id="never-catalogued")


# --- registration -------------------------------------------------------------------------


def test_registration_with_a_signed_challenge() -> None:
    user, identity, model = make_user(), Identity.generate(), make_model(num_blocks=8)
    provider = register(
        user=user,
        identity=identity,
        model=model,
        start=2,
        end=6,
        price=1234,
        gpu="RTX 4090",
        gpu_memory_mb=24_000,
        region="eu-west",
    )

    assert provider.peer_id == identity.peer_id
    assert bytes.fromhex(provider.public_key) == identity.public_key
    assert (provider.block_start, provider.block_end, provider.price) == (2, 6, 1234)
    assert provider.state == Provider.State.JOINING
    assert provider.earnings_account.kind == Account.Kind.EARNINGS and provider.earnings_account.user == user
    assert ProviderEvent.objects.filter(provider=provider, kind="registered").exists()


def test_registration_message_is_the_documented_bytes() -> None:
    nonce = "ab" * 32
    assert registration_message(nonce) == b"hivemart-register:" + bytes([0xAB] * 32)


def _attempt(user, identity, model, *, challenge=None, signature=None, peer_id=None, public_key=None):  # noqa: ANN001,ANN202
    challenge = challenge or challenge_issue(user=user).nonce
    return provider_register(
        user=user,
        peer_id=peer_id or identity.peer_id,
        public_key=public_key or identity.public_key,
        challenge=challenge,
        signature=signature or identity.sign(registration_message(challenge)),
        offer=OfferSpec(model=model, block_start=0, block_end=model.num_blocks, price=10),
    )


def test_registration_refuses_a_signature_by_another_key() -> None:
    user, identity, model = make_user(), Identity.generate(), make_model()
    challenge = challenge_issue(user=user).nonce
    forged = Identity.generate().sign(registration_message(challenge))
    with pytest.raises(PermissionDenied) as e:
        _attempt(user, identity, model, challenge=challenge, signature=forged)
    assert e.value.code == "invalid_signature"
    assert not Provider.objects.exists()


def test_registration_refuses_a_signature_of_other_bytes() -> None:
    user, identity, model = make_user(), Identity.generate(), make_model()
    challenge = challenge_issue(user=user).nonce
    with pytest.raises(PermissionDenied):
        _attempt(user, identity, model, challenge=challenge, signature=identity.sign(challenge.encode()))


def test_registration_refuses_a_peer_id_of_another_key() -> None:
    user, identity, model = make_user(), Identity.generate(), make_model()
    with pytest.raises(PermissionDenied) as e:
        _attempt(user, identity, model, peer_id=Identity.generate().peer_id)
    assert e.value.code == "peer_id_mismatch"


def test_challenges_are_single_use_per_user_and_expire() -> None:
    user, model = make_user(), make_model()
    challenge = challenge_issue(user=user).nonce
    _attempt(user, Identity.generate(), model, challenge=challenge)
    with pytest.raises(ValidationFailed) as e:
        _attempt(user, Identity.generate(), model, challenge=challenge)
    assert e.value.code == "invalid_challenge"

    someone_elses = challenge_issue(user=make_user()).nonce
    with pytest.raises(ValidationFailed):
        _attempt(user, Identity.generate(), model, challenge=someone_elses)

    expired = challenge_issue(user=user, now=timezone.now() - timedelta(hours=1)).nonce
    with pytest.raises(ValidationFailed):
        _attempt(user, Identity.generate(), model, challenge=expired)


def test_a_failed_attempt_uses_up_the_challenge() -> None:
    user, identity, model = make_user(), Identity.generate(), make_model()
    challenge = challenge_issue(user=user).nonce
    with pytest.raises(PermissionDenied):
        _attempt(user, identity, model, challenge=challenge, signature=bytes(64))
    assert RegistrationChallenge.objects.get(nonce=challenge).used_at is not None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(public_key=b"short"), "public_key"),
        (dict(signature=b"x" * 63), "signature"),
        (dict(peer_id="not base58 0OIl"), "peer_id"),
    ],
)
def test_registration_rejects_malformed_keys_and_signatures(kwargs: dict, field: str) -> None:
    user, identity, model = make_user(), Identity.generate(), make_model()
    with pytest.raises(ValidationFailed) as e:
        _attempt(user, identity, model, **kwargs)
    assert e.value.extra["field"] == field


@pytest.mark.parametrize("start, end, price", [(0, 5, 1), (3, 3, 1), (4, 5, 1), (0, 4, -1), (0, 4, 10**16)])
def test_registration_rejects_spans_outside_the_model_and_bad_prices(start: int, end: int, price: int) -> None:
    with pytest.raises(ValidationFailed):
        register(
            user=make_user(),
            identity=Identity.generate(),
            model=make_model(num_blocks=4),
            start=start,
            end=end,
            price=price,
        )


def test_reregistration_updates_the_owners_provider() -> None:
    user, identity, model = make_user(), Identity.generate(), make_model(num_blocks=8)
    first = make_provider(user=user, model=model, start=0, end=4)
    assert first.state == Provider.State.ONLINE
    again = register(user=user, identity=Identity.generate(), model=model)  # another agent: another provider
    assert again.pk != first.pk

    same = register(user=user, identity=identity, model=model, start=0, end=2)
    moved = register(user=user, identity=identity, model=model, start=4, end=8, price=7)
    assert moved.pk == same.pk and (moved.block_start, moved.block_end, moved.price) == (4, 8, 7)
    assert moved.earnings_account_id == same.earnings_account_id


def test_a_peer_id_cannot_be_taken_over_by_another_user() -> None:
    identity, model = Identity.generate(), make_model()
    register(user=make_user(), identity=identity, model=model)
    with pytest.raises(Conflict):
        register(user=make_user(), identity=identity, model=model)


# --- heartbeats, measurements, offers -----------------------------------------------------


def test_heartbeat_records_state_and_self_reported_figures() -> None:
    provider = make_provider(online=False)
    provider = provider_heartbeat(provider=provider, state="online", throughput=5000.0, latency_ms=12.5)
    assert (provider.state, provider.reported_throughput, provider.reported_latency_ms) == ("online", 5000.0, 12.5)
    assert ProviderEvent.objects.filter(
        provider=provider, kind="state", from_state="joining", to_state="online"
    ).exists()
    for bad in (dict(state="busy"), dict(state="online", throughput=-1), dict(state="online", latency_ms=float("nan"))):
        with pytest.raises(ValidationFailed):
            provider_heartbeat(provider=provider, **bad)


def test_measured_figures_replace_self_reported_ones_in_offers() -> None:
    model = make_model()
    provider = make_provider(model=model)
    [offer] = offers_for_model(model=model)
    assert (offer.throughput, offer.measured, offer.success_rate) == (1000.0, False, None)

    now = timezone.now()
    provider_measurement_record(provider=provider, throughput=400.0, latency_ms=80.0, success_rate=0.9, measured_at=now)
    provider_heartbeat(provider=provider, state="online", throughput=99999.0)  # bragging changes nothing
    [offer] = offers_for_model(model=model)
    assert (offer.throughput, offer.latency_ms, offer.success_rate, offer.measured) == (400.0, 80.0, 0.9, True)

    # an older probe finishing late does not replace the latest figures
    provider_measurement_record(
        provider=provider, throughput=1.0, latency_ms=1.0, success_rate=1.0, measured_at=now - timedelta(minutes=5)
    )
    assert offers_for_model(model=model)[0].throughput == 400.0
    assert provider.measurements.count() == 2
    with pytest.raises(ValidationFailed):
        provider_measurement_record(provider=provider, throughput=1.0, latency_ms=1.0, success_rate=1.5)


def test_offers_list_only_online_unsuspended_providers_of_the_model() -> None:
    model, other = make_model(num_blocks=8), make_model()
    cheap_tail = make_provider(model=model, start=4, end=8, price=5)
    head = make_provider(model=model, start=0, end=4, price=50)
    dear_tail = make_provider(model=model, start=4, end=8, price=9)
    make_provider(model=model, online=False)
    suspended = make_provider(model=model)
    provider_suspend(provider=suspended, reason="failed an audit")
    draining = provider_heartbeat(provider=make_provider(model=model), state="draining")
    make_provider(model=other)

    assert [o.provider_id for o in offers_for_model(model=model)] == [head.pk, cheap_tail.pk, dear_tail.pk]
    assert draining.pk in [o.provider_id for o in offers_for_model(model=model, include_draining=True)]
    assert offers_for_model(model=model)[1].covers(5, 8) and not offers_for_model(model=model)[1].covers(3, 8)


def test_offer_update_changes_span_and_price() -> None:
    model = make_model(num_blocks=8)
    provider = provider_offer_update(
        provider=make_provider(model=model), offer=OfferSpec(model=model, block_start=2, block_end=3, price=77)
    )
    assert (provider.block_start, provider.block_end, provider.price) == (2, 3, 77)
    with pytest.raises(ValidationFailed):
        provider_offer_update(provider=provider, offer=OfferSpec(model=model, block_start=7, block_end=9, price=1))


def test_missed_heartbeats_mark_providers_offline(settings) -> None:  # noqa: ANN001 - pytest-django fixture
    settings.HIVEMART_HEARTBEAT_TIMEOUT_S = 60
    fresh, stale = make_provider(), make_provider()
    now = timezone.now()
    Provider.objects.filter(pk=stale.pk).update(last_heartbeat_at=now - timedelta(seconds=61))

    assert providers_mark_stale(now=now) == 1
    assert Provider.objects.get(pk=stale.pk).state == Provider.State.OFFLINE
    assert Provider.objects.get(pk=fresh.pk).state == Provider.State.ONLINE
    assert ProviderEvent.objects.filter(provider=stale, to_state="offline", reason="missed heartbeats").count() == 1
    assert providers_mark_stale(now=now) == 0  # idempotent
    assert providers_mark_stale(now=now + timedelta(seconds=120)) == 1  # now the fresh one is stale too
