"""The REST client against the real marketplace: in-process through WSGI (sharing the test's
database transaction), and once over a real socket to a live server."""

from __future__ import annotations

import httpx
import pytest

from hivemart_core.api import Client, Job
from hivemart_core.errors import (
    AuthenticationError,
    ConflictError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from hivemart_core.protocol.identity import Identity
from marketplace.accounts.services import api_key_create, user_create
from marketplace.ledger.services import credit_grant, wallet_get_or_create


def client_for(
    transport: httpx.BaseTransport,
    username: str,
    *,
    staff: bool = False,
    credits: int = 0,
    base_url: str = "http://testserver",
) -> Client:
    user = user_create(username=username, is_staff=staff)
    if credits:
        credit_grant(account=wallet_get_or_create(user=user), amount=credits)
    return Client(api_key=api_key_create(user=user).raw, base_url=base_url, transport=transport, max_retries=0)


def catalogue(staff: Client, model_id: str = "llama-4x64-000000000001", blocks: int = 4) -> None:
    staff.models.create(
        model_id=model_id,
        arch="llama",
        num_blocks=blocks,
        hidden_size=64,
        dtype="float32",
        weights_digest="a" * 64,
        block_digests=[f"{i:064x}" for i in range(blocks)],
    )


def test_a_whole_marketplace_round_trip(wsgi: httpx.WSGITransport) -> None:
    staff = client_for(wsgi, "ops", staff=True)
    catalogue(staff)

    # a provider signs up, registers its agent's key and heartbeats
    anon = Client(base_url="http://testserver", transport=wsgi, max_retries=0)
    signup = anon.accounts.signup(username="gpu-owner", password="a long passphrase 42")
    provider_client = Client(api_key=signup.api_key.key, base_url="http://testserver", transport=wsgi)
    identity = Identity.generate()
    provider = provider_client.providers.register(
        identity=identity,
        model="llama-4x64-000000000001",
        block_start=0,
        block_end=4,
        price=1_000,
        gpu="RTX 4090",
        gpu_memory_mb=24_564,
    )
    assert provider.peer_id == identity.peer_id and provider.state == "joining"
    provider = provider_client.providers.heartbeat(provider.id, state="online", throughput=800.0, latency_ms=9.0)
    assert provider.state == "online" and provider.reported_throughput == 800.0
    staff.providers.record_measurement(provider.id, throughput=500.0, latency_ms=20.0, success_rate=1.0)
    [offer] = staff.models.offers("llama-4x64-000000000001")
    assert (offer.peer_id, offer.throughput, offer.measured) == (identity.peer_id, 500.0, True)

    # a client creates a job (twice with one key: one job, one hold), the scheduler plans it
    client = client_for(wsgi, "researcher", credits=5_000_000)
    job = client.jobs.create(
        model="llama-4x64-000000000001", kind="finetune", budget=2_000_000, max_price=1_500, idempotency_key="exp-1"
    )
    again = client.jobs.create(
        model="llama-4x64-000000000001", kind="finetune", budget=2_000_000, max_price=1_500, idempotency_key="exp-1"
    )
    assert isinstance(job, Job) and again.id == job.id and job.hold.left == 2_000_000
    assert client.accounts.me().wallet_balance == 3_000_000
    plan = staff.jobs.store_plan(job.id, segments=[{"block_start": 0, "block_end": 4, "provider": provider.id}])
    assert plan.segments[0].peer_id == identity.peer_id
    assert client.jobs.plan(job.id).version == 1
    assert client.jobs.transition(job.id, to_state="running").state == "running"

    # cancelling gives the hold back; the books show it
    cancelled = client.jobs.cancel(job.id, reason="done early")
    assert cancelled.state == "cancelled" and cancelled.hold.state == "closed"
    assert [t.to_state for t in client.jobs.transitions(job.id)] == ["pending", "planned", "running", "cancelled"]
    assert client.accounts.me().wallet_balance == 5_000_000
    kinds = [p.kind for p in client.ledger.iter_postings(page_size=1)]
    assert sorted(kinds) == ["grant", "hold", "hold", "release", "release"]  # wallet and escrow legs
    assert [h.state for h in client.ledger.holds()] == ["closed"]
    assert {a.kind for a in client.ledger.accounts()} == {"wallet", "escrow"}
    assert [j.id for j in client.jobs.iter(state="cancelled")] == [job.id]


def test_keys_resource(wsgi: httpx.WSGITransport) -> None:
    client = client_for(wsgi, "alice")
    created = client.keys.create(name="laptop")
    assert created.key.startswith("hm_") and created.name == "laptop"
    assert {k.name for k in client.keys.iter(page_size=1)} == {"", "laptop"}
    other = Client(api_key=created.key, base_url="http://testserver", transport=wsgi)
    assert other.accounts.me().username == "alice"
    assert client.keys.revoke(created.id).active is False
    with pytest.raises(AuthenticationError):
        other.accounts.me()


def test_errors_from_the_real_server_carry_status_code_and_request_id(wsgi: httpx.WSGITransport) -> None:
    staff = client_for(wsgi, "ops", staff=True)
    catalogue(staff)
    client = client_for(wsgi, "bob", credits=100)

    with pytest.raises(InsufficientCreditsError) as e:
        client.jobs.create(model="llama-4x64-000000000001", kind="inference", budget=101, max_price=1)
    assert e.value.status == 402 and e.value.extra["balance"] == 100 and len(e.value.request_id) == 32
    with pytest.raises(ValidationError) as e:
        client.jobs.create(model="no-such-model", kind="inference", budget=1, max_price=1)
    assert e.value.code == "invalid"
    with pytest.raises(ValidationError) as e:
        client.jobs.create(model="llama-4x64-000000000001", kind="inference", budget=-1, max_price=1)
    assert "budget" in e.value.extra["fields"]
    with pytest.raises(ConflictError) as e:
        client.jobs.create(
            model="llama-4x64-000000000001", kind="inference", budget=1, max_price=1, idempotency_key="x"
        )
        client.jobs.create(
            model="llama-4x64-000000000001", kind="inference", budget=2, max_price=1, idempotency_key="x"
        )
    assert e.value.code == "idempotency_key_reused"  # the API refuses it before the job service sees it
    with pytest.raises(NotFoundError):
        client.jobs.get(10**9)
    with pytest.raises(PermissionDeniedError):
        client.ledger.grant(username="bob", amount=1)
    with pytest.raises(PermissionDeniedError) as e:
        client.providers.register(
            identity=_Forger(), model="llama-4x64-000000000001", block_start=0, block_end=4, price=1
        )
    assert e.value.code == "invalid_signature"
    with pytest.raises(AuthenticationError):
        Client(api_key="hm_bogus", base_url="http://testserver", transport=wsgi).accounts.me()


class _Forger:
    """Claims one identity's peer id and key but signs with another key."""

    def __init__(self) -> None:
        self._claimed, self._signer = Identity.generate(), Identity.generate()
        self.peer_id, self.public_key = self._claimed.peer_id, self._claimed.public_key

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)


def test_over_a_real_socket(live_server) -> None:  # noqa: ANN001 - pytest-django fixture
    staff = client_for(None, "ops", staff=True, base_url=live_server.url)
    catalogue(staff, model_id="socket-model", blocks=2)
    client = client_for(None, "carol", credits=1_000, base_url=live_server.url)
    with client:
        job = client.jobs.create(model="socket-model", kind="inference", budget=600, max_price=10)
        assert client.jobs.get(job.id).hold.left == 600
        assert client.accounts.me().wallet_balance == 400
