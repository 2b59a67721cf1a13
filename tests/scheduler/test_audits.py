"""Audits with a real generated checkpoint in HIVEMART_MODELS_DIR: the platform validator
recomputes the disputed span, the cheater's work is voided and clawed back, its reputation
falls, repeated offenders are suspended and no longer matched, and the books stay balanced."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import torch
from rest_framework.test import APIClient

from hivemart_core.models import compute_digests, create_model, load_model_info
from hivemart_core.models.backend import SpanBackend
from hivemart_core.protocol.framing import encode_message
from marketplace.accounts.services import api_key_create
from marketplace.catalog.models import CatalogModel
from marketplace.catalog.services import catalog_model_create
from marketplace.common.errors import ValidationFailed
from marketplace.jobs.services import SegmentSpec, job_create, job_plan_store
from marketplace.ledger.models import Account
from marketplace.ledger.selectors import hold_left, ledger_verify
from marketplace.providers.models import Provider
from marketplace.providers.selectors import offers_for_model
from marketplace.receipts.models import Audit, Offence, Receipt, Ticket
from marketplace.receipts.services import audit_create, receipts_settle, receipts_upload
from scheduler.audit import judge
from scheduler.services import audit_decide
from tests.marketplace.factories import make_user, make_wallet
from tests.marketplace.settlement import PlannedJob, planned_job, platform_key_file

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama in a models folder, under a folder name that is not its model id."""
    models = tmp_path_factory.mktemp("models")
    return create_model(models / "tiny-llama", hidden=64, layers=3, heads=4, seed=7)


@pytest.fixture
def model(checkpoint: Path, settings: Any, tmp_path: Path) -> CatalogModel:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    settings.HIVEMART_MODELS_DIR = checkpoint.parent
    settings.HIVEMART_SUSPEND_AFTER = 2
    settings.HIVEMART_REPUTATION_PENALTY = 25
    info = load_model_info(checkpoint)
    digests = compute_digests(checkpoint)
    return catalog_model_create(
        model_id=info.model_id,
        arch=info.arch,
        num_blocks=info.num_blocks,
        hidden_size=info.hidden_size,
        dtype="float32",
        weights_digest=digests["model"],
        block_digests=digests["blocks"],
    )


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> SpanBackend:
    return SpanBackend(checkpoint, 0, 3, dtype=torch.float32)


def blob(tensor: torch.Tensor) -> bytes:
    return b"".join(bytes(frame) for frame in encode_message({}, [tensor]))


def outputs(backend: SpanBackend, *, positions: int = 6, last: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(inputs, the honest output for the last positions, a perturbed copy of it)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, positions, 64, generator=generator)
    honest = backend.forward(x, 0, 3)[:, -last:, :]
    noise = torch.randn(honest.shape, generator=generator) * 0.02 * honest.abs().max()
    return x, honest, honest + noise


DEPOSIT = 100_000  # HIVEMART_AUDIT_DEPOSIT's default: audits here carry no evidence


def file_audit(
    pj: PlannedJob,
    provider: Provider,
    backup: Provider,
    inputs: torch.Tensor,
    claimed: torch.Tensor,
    reference: torch.Tensor,
    *,
    evidence: dict[str, Any] | None = None,
) -> Audit:
    """An audit of blocks 0:3 of the client's session; with ``evidence`` (a proof of the claimed
    output) instead of the deposit."""
    return audit_create(
        user=pj.client,
        job=pj.job,
        ticket_id=pj.ticket(provider).ticket_id,
        session_id="session-0001",
        start=0,
        end=3,
        dtype="float32",
        inputs=blob(inputs),
        claimed=blob(claimed),
        reference=blob(reference),
        reference_peer=backup.peer_id,
        evidence=evidence,
        deposit=0 if evidence else DEPOSIT,
    )


def earnings(provider: Provider) -> int:
    return Account.objects.get(pk=provider.earnings_account_id).balance


def upload(pj: PlannedJob, *receipts: Any) -> None:
    outcomes = receipts_upload(user=pj.client, receipts=[r.to_dict() for r in receipts])
    assert [o.status for o in outcomes] == ["accepted"] * len(receipts)


@pytest.mark.parametrize(
    "claimed_ok,reference_ok,verdict",
    [
        (False, True, "provider_cheated"),
        (True, False, "backup_cheated"),
        (True, True, "reporter_wrong"),
        (False, False, "inconclusive"),
    ],
)
def test_the_verdict_table(claimed_ok: bool, reference_ok: bool, verdict: str) -> None:
    assert judge(claimed_ok, reference_ok) == verdict


def test_a_cheating_provider_is_voided_clawed_back_and_after_two_offences_suspended(
    model: CatalogModel, backend: SpanBackend
) -> None:
    pj = planned_job(model=model, budget=1_000_000, price=1_000)
    cheater, backup = pj.providers[0], pj.backups[0]
    counter = pj.counter(cheater)
    upload(pj, pj.receipt(cheater, 4_000_000, counter=counter))
    receipts_settle()
    assert earnings(cheater) == 4_000 - 200
    wallet_fees = Account.objects.get(kind=Account.Kind.FEES).balance
    upload(pj, pj.receipt(cheater, 1_000_000, counter=counter))  # not settled yet when the audit lands

    x, honest, perturbed = outputs(backend)
    audit = file_audit(pj, cheater, backup, x, perturbed, honest)
    assert audit_decide(audit_id=audit.pk) == {"audit": audit.pk, "verdict": "provider_cheated", "decided": True}
    audit.refresh_from_db()
    assert (audit.state, audit.verdict) == ("decided", "provider_cheated") and "MISMATCH" in audit.detail
    # voided, clawed back (with the fee), never paid again
    assert Ticket.objects.filter(job=pj.job, provider=cheater, voided_at__isnull=True).count() == 0
    assert earnings(cheater) == 0
    assert Account.objects.get(kind=Account.Kind.FEES).balance == wallet_fees - 200
    assert hold_left(hold=pj.job.hold) == 1_000_000
    assert receipts_settle().captured == 0 and earnings(cheater) == 0
    rejected = receipts_upload(user=pj.client, receipts=[pj.receipt(cheater, 1, counter=counter).to_dict()])[0]
    assert rejected.code == "receipt_voided"
    cheater.refresh_from_db()
    assert cheater.reputation == 75 and not cheater.is_suspended
    assert Offence.objects.get(provider=cheater).kind == "audit"
    # deciding again changes nothing
    assert audit_decide(audit_id=audit.pk)["decided"] is False

    # a second job, a second offence: suspended, and out of matching
    second = planned_job(model=model, reuse=[cheater])
    assert second.providers[0] == cheater
    x, honest, perturbed = outputs(backend, seed=1)
    audit = file_audit(second, cheater, second.backups[0], x, perturbed, honest)
    assert audit_decide(audit_id=audit.pk)["verdict"] == "provider_cheated"
    cheater.refresh_from_db()
    assert cheater.reputation == 50 and cheater.is_suspended
    assert cheater.pk not in {o.provider_id for o in offers_for_model(model=model)}
    client = make_wallet(user=make_user(), credits=1_000_000).user
    job, _ = job_create(
        user=client,
        kind="inference",
        model_id=model.model_id,
        budget=1_000,
        max_price=10_000,
        idempotency_key="after-suspension",
    )
    with pytest.raises(ValidationFailed):
        job_plan_store(job=job, segments=[SegmentSpec(block_start=0, block_end=3, provider=cheater)])
    assert ledger_verify().consistent


def test_honest_providers_are_not_punished(model: CatalogModel, backend: SpanBackend) -> None:
    pj = planned_job(model=model)
    provider, backup = pj.providers[0], pj.backups[0]
    upload(pj, pj.receipt(provider, 2_000_000))
    receipts_settle()
    x, honest, perturbed = outputs(backend, seed=2)
    verdicts = [
        audit_decide(audit_id=file_audit(pj, provider, backup, x, claimed, reference).pk)["verdict"]
        for claimed, reference in ((honest, honest), (honest, perturbed), (perturbed, perturbed))
    ]
    assert verdicts == ["reporter_wrong", "backup_cheated", "inconclusive"]
    provider.refresh_from_db()
    backup.refresh_from_db()
    assert (provider.reputation, backup.reputation) == (100, 100) and not Offence.objects.exists()
    assert earnings(provider) == 2_000 - 100
    assert not Ticket.objects.filter(voided_at__isnull=False).exists()


def test_malformed_tensors_and_a_missing_checkpoint_are_inconclusive(
    model: CatalogModel, backend: SpanBackend, settings: Any, tmp_path: Path
) -> None:
    pj = planned_job(model=model)
    provider, backup = pj.providers[0], pj.backups[0]
    x, honest, perturbed = outputs(backend, seed=3)
    wrong_width = file_audit(pj, provider, backup, x[..., :32], perturbed, honest)
    assert audit_decide(audit_id=wrong_width.pk)["verdict"] == "inconclusive"
    garbage = audit_create(
        user=pj.client,
        job=pj.job,
        ticket_id=pj.ticket(provider).ticket_id,
        session_id="session-0001",
        start=0,
        end=3,
        dtype="float32",
        inputs=b"\x00" * 40,
        claimed=blob(perturbed),
        reference=blob(honest),
        reference_peer=backup.peer_id,
        deposit=DEPOSIT,
    )
    assert audit_decide(audit_id=garbage.pk)["verdict"] == "inconclusive"
    assert "malformed" in Audit.objects.get(pk=garbage.pk).detail
    settings.HIVEMART_MODELS_DIR = tmp_path / "empty"
    unknown = file_audit(pj, provider, backup, x, perturbed, honest)
    assert audit_decide(audit_id=unknown.pk)["verdict"] == "inconclusive"
    assert not Offence.objects.exists()


def test_the_audits_api(model: CatalogModel, backend: SpanBackend) -> None:
    pj = planned_job(model=model)
    provider, backup = pj.providers[0], pj.backups[0]
    x, honest, perturbed = outputs(backend, seed=4)
    body = {
        "job": pj.job.pk,
        "ticket_id": pj.ticket(provider).ticket_id,
        "session_id": "session-0001",
        "start": 0,
        "end": 3,
        "dtype": "float32",
        "inputs": base64.b64encode(blob(x)).decode(),
        "claimed": base64.b64encode(blob(perturbed)).decode(),
        "reference": base64.b64encode(blob(honest)).decode(),
        "reference_peer": backup.peer_id,
        "deposit": DEPOSIT,
    }

    def api(user: Any) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")
        return client

    owner = api(pj.client)
    response = owner.post("/api/audits/", body, format="json")
    assert response.status_code == 201, response.json()
    created = response.json()
    assert (created["state"], created["provider"], created["reference_provider"]) == ("open", provider.pk, backup.pk)
    assert api(make_user()).post("/api/audits/", body, format="json").status_code == 404
    assert api(provider.user).post("/api/audits/", body, format="json").status_code == 404
    bad = [
        ({"reference_peer": provider.peer_id}, "bad_reference"),
        ({"end": 4}, "invalid"),
        ({"claimed": "not base64!"}, "invalid"),
        ({"ticket_id": "nope-nope-nope"}, "not_found"),
        ({"dtype": "int8"}, "invalid"),
        ({"inputs": base64.b64encode(b"\0" * (8 * 1024 * 1024 + 1)).decode()}, "invalid"),
    ]
    for change, code in bad:
        response = owner.post("/api/audits/", {**body, **change}, format="json")
        assert response.json()["code"] == code, (change, response.json())
    audit_decide(audit_id=created["id"])
    listed = owner.get("/api/audits/", {"job": pj.job.pk}).json()["results"]
    assert [(a["id"], a["verdict"]) for a in listed] == [(created["id"], "provider_cheated")]
    assert owner.get(f"/api/audits/{created['id']}/").json()["verdict"] == "provider_cheated"
    assert api(make_user()).get("/api/audits/").json()["count"] == 0
    shown = api(provider.user).get(f"/api/providers/{provider.pk}/").json()
    assert shown["reputation"] == 75
    offences = api(provider.user).get("/api/offences/", {"provider": provider.pk}).json()["results"]
    assert [(o["kind"], o["job"], o["audit"]) for o in offences] == [("audit", pj.job.pk, created["id"])]
    assert api(make_user()).get("/api/offences/").json()["count"] == 0
    assert api(pj.client).get("/api/offences/").json()["count"] == 0  # the provider's business, not the client's
    assert Receipt.objects.count() == 0


def test_evidence_proves_the_claimed_output_was_signed_for(
    model: CatalogModel, backend: SpanBackend, settings: Any
) -> None:
    from hivemart_core.protocol.receipts import tensor_digest

    pj = planned_job(model=model)
    provider, backup = pj.providers[0], pj.backups[0]
    x, honest, perturbed = outputs(backend, seed=5)
    # the provider's session: three outputs, the second one the perturbed answer
    counter = pj.counter(provider)
    sent = [torch.randn(1, 2, 64), perturbed, torch.randn(1, 2, 64)]
    for out in sent:
        counter.record(2 * 3, tensor_digest(out))
    receipt = counter.receipt(pj.identities[provider.pk])
    digests = [tensor_digest(out).hex() for out in sent]

    def audit(**evidence: Any) -> Audit:
        proof = {"receipt": receipt.to_dict(), "digests": digests, "step": 1, **evidence}
        return file_audit(pj, provider, backup, x, perturbed, honest, evidence=proof)

    assert audit().claimed_proven
    forged_receipt = {**receipt.to_dict(), "units": receipt.units + 1}
    for change in (
        {"step": 0},
        {"digests": digests[::-1]},
        {"digests": digests[:2]},
        {"receipt": forged_receipt},
        {"step": 3},
    ):
        with pytest.raises(ValidationFailed) as e:
            audit(**change)
        assert e.value.code == "bad_evidence", change
    settings.HIVEMART_AUDIT_REQUIRE_EVIDENCE = True
    with pytest.raises(ValidationFailed) as e:
        file_audit(pj, provider, backup, x, perturbed, honest)
    assert e.value.code == "evidence_required"


def test_a_replan_never_brings_back_a_provider_caught_cheating(model: CatalogModel, backend: SpanBackend) -> None:
    from scheduler.services import job_replan

    pj = planned_job(model=model, backups=2)
    primary, cheater, honest_backup = pj.providers[0], *pj.backups
    x, honest, perturbed = outputs(backend, seed=6)
    # the first backup was caught (say while serving after a failover) ...
    audit = file_audit(pj, cheater, primary, x, perturbed, honest)
    assert audit_decide(audit_id=audit.pk)["verdict"] == "provider_cheated"
    # ... then the primary fails: the replacement is the honest backup, and the cheater is
    # neither chosen nor kept as a backup
    replan = job_replan(job=pj.job, by=pj.client, failed_provider_id=primary.pk)
    segments = list(replan.plan.segments.all())
    chosen = {s.provider_id for s in segments} | {b.provider_id for s in segments for b in s.backups.all()}
    assert chosen == {honest_backup.pk}
    assert set(Ticket.objects.filter(plan=replan.plan).values_list("provider_id", flat=True)) == {honest_backup.pk}
