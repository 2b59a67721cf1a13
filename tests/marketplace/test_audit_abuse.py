"""Audits as an attacker uses them: fabricated tensors with no evidence and no deposit, a
1 micro-credit job storing 24 MiB, many jobs to get around a per-job cap. Each is refused
(or costs the attacker its deposit), nothing is stored, and the books stay consistent. A
deposit comes back when the audit catches a cheating provider and goes to the platform's
fees when it proves nothing, once, through the ledger's services."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from hivemart_core.protocol.identity import Identity
from marketplace.accounts.models import User
from marketplace.accounts.services import api_key_create
from marketplace.common.errors import Conflict, InsufficientCredits, ValidationFailed
from marketplace.jobs.models import Job
from marketplace.jobs.services import SegmentSpec, job_create, job_plan_store
from marketplace.ledger.models import Account, Hold, Transaction
from marketplace.ledger.selectors import ledger_verify, wallet_balance
from marketplace.ledger.services import platform_account
from marketplace.receipts.models import Audit, Ticket
from marketplace.receipts.services import audit_create, audit_verdict_record
from tests.marketplace.factories import make_model, make_user, make_wallet, register
from tests.marketplace.settlement import make_provider_online, planned_job, platform_key_file

pytestmark = pytest.mark.django_db

MIB = 1024 * 1024
DEPOSIT = 100_000


@pytest.fixture(autouse=True)
def audit_settings(settings: Any, tmp_path: Path) -> Any:
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    settings.HIVEMART_AUDIT_DEPOSIT = DEPOSIT
    settings.HIVEMART_AUDIT_REQUIRE_EVIDENCE = False
    return settings


def job_of(user: User, *, budget: int = 1_000_000) -> tuple[Job, Ticket, str]:
    """A job of ``user`` planned on a fresh provider with one backup: (job, the provider's
    ticket, the backup's peer id)."""
    model = make_model()
    primary, backup = (
        make_provider_online(register(user=make_user(), identity=Identity.generate(), model=model)) for _ in range(2)
    )
    job, _ = job_create(
        user=user,
        kind="inference",
        model_id=model.model_id,
        budget=budget,
        max_price=10_000,
        idempotency_key=f"abuse-{os.urandom(6).hex()}",
    )
    job_plan_store(job=job, segments=[SegmentSpec(block_start=0, block_end=4, provider=primary, backups=[backup])])
    return job, Ticket.objects.get(job=job, provider=primary), backup.peer_id


def file(user: User, job: Job, ticket: Ticket, backup_peer: str, *, size: int = 1024, **extra: Any) -> Audit:
    """Fabricated tensors: random bytes, ``size`` each."""
    return audit_create(
        user=user,
        job=job,
        ticket_id=ticket.ticket_id,
        session_id="session-0001",
        start=0,
        end=4,
        dtype="float32",
        inputs=os.urandom(size),
        claimed=os.urandom(size),
        reference=os.urandom(size),
        reference_peer=backup_peer,
        **extra,
    )


def api(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user).raw}")
    return client


def fees() -> int:
    return platform_account(Account.Kind.FEES).balance


def test_fabricated_tensors_with_no_evidence_and_no_deposit_are_refused() -> None:
    pj = planned_job()
    ticket, backup = pj.ticket(pj.providers[0]), pj.backups[0]
    blob = base64.b64encode(os.urandom(4096)).decode()
    body = {
        "job": pj.job.pk,
        "ticket_id": ticket.ticket_id,
        "session_id": "session-0001",
        "start": 0,
        "end": 4,
        "dtype": "float32",
        "inputs": blob,
        "claimed": blob,
        "reference": blob,
        "reference_peer": backup.peer_id,
    }
    balance = wallet_balance(user=pj.client)
    owner = api(pj.client)
    response = owner.post("/api/audits/", body, format="json")
    assert response.status_code == 400
    assert response.json()["code"] == "evidence_or_deposit_required"
    assert response.json()["extra"]["minimum"] == DEPOSIT
    # Too small a deposit, or one that is not an integer, is no deposit.
    for deposit in (DEPOSIT - 1, -DEPOSIT, "100000", 1e5, True):
        refused = owner.post("/api/audits/", {**body, "deposit": deposit}, format="json")
        assert refused.status_code == 400, deposit
    # Forged evidence is no evidence.
    forged = {"receipt": {"ticket_id": ticket.ticket_id}, "digests": [], "step": 0}
    assert owner.post("/api/audits/", {**body, "evidence": forged}, format="json").json()["code"] == "bad_evidence"
    assert not Audit.objects.exists() and not Hold.objects.filter(memo__contains="audit").exists()
    assert wallet_balance(user=pj.client) == balance
    # With the deposit, it is filed, and the deposit is held from the wallet.
    filed = owner.post("/api/audits/", {**body, "deposit": DEPOSIT}, format="json")
    assert filed.status_code == 201, filed.json()
    assert (filed.json()["deposit"], filed.json()["deposit_state"]) == (DEPOSIT, "held")
    assert wallet_balance(user=pj.client) == balance - DEPOSIT
    assert ledger_verify().consistent


def test_a_one_micro_credit_job_cannot_store_three_8_mib_tensors(settings: Any) -> None:
    settings.HIVEMART_AUDIT_QUOTA_BYTES = 64 * MIB
    attacker = make_wallet(user=make_user(), credits=1).user
    job, ticket, backup_peer = job_of(attacker, budget=1)
    assert wallet_balance(user=attacker) == 0  # all of it is the job's hold
    big = base64.b64encode(os.urandom(8 * MIB)).decode()
    body = {
        "job": job.pk,
        "ticket_id": ticket.ticket_id,
        "session_id": "session-0001",
        "start": 0,
        "end": 4,
        "dtype": "float32",
        "inputs": big,
        "claimed": big,
        "reference": big,
        "reference_peer": backup_peer,
    }
    owner = api(attacker)
    assert owner.post("/api/audits/", body, format="json").json()["code"] == "evidence_or_deposit_required"
    # A deposit it cannot pay is refused too (402), and nothing was stored either way.
    unpaid = owner.post("/api/audits/", {**body, "deposit": DEPOSIT}, format="json")
    assert unpaid.status_code == 402 and unpaid.json()["code"] == "insufficient_credits"
    assert not Audit.objects.exists() and not Audit.objects.filter(stored_bytes__gt=0).exists()
    assert wallet_balance(user=attacker) == 0 and ledger_verify().consistent


def test_the_storage_quota_counts_every_job_of_one_user(settings: Any) -> None:
    settings.HIVEMART_AUDIT_QUOTA_BYTES = 7 * MIB
    user = make_wallet(user=make_user(), credits=100_000_000).user
    jobs = [job_of(user) for _ in range(3)]
    first = file(user, *jobs[0], size=MIB, deposit=DEPOSIT)  # 3 MiB
    file(user, *jobs[1], size=MIB, deposit=DEPOSIT)  # 6 MiB
    # A third job is no way around the limit: the quota is the user's, not the job's.
    with pytest.raises(Conflict) as refused:
        file(user, *jobs[2], size=MIB, deposit=DEPOSIT)
    assert refused.value.code == "audit_quota_exceeded"
    assert refused.value.extra == {"used": 6 * MIB, "needed": 3 * MIB, "quota": 7 * MIB}
    assert Audit.objects.filter(reporter=user).count() == 2
    assert wallet_balance(user=user) == 100_000_000 - 3 * 1_000_000 - 2 * DEPOSIT  # the refused one held nothing
    # Another user is not limited by this one's audits.
    other = make_wallet(user=make_user(), credits=10_000_000).user
    assert file(other, *job_of(other), size=MIB, deposit=DEPOSIT).stored_bytes == 3 * MIB
    # A verdict drops an audit's tensors and frees its space.
    decided = audit_verdict_record(audit_id=first.pk, verdict="reporter_wrong", detail="both outputs match")
    assert (bytes(decided.inputs), bytes(decided.claimed), bytes(decided.reference), decided.stored_bytes) == (
        b"",
        b"",
        b"",
        0,
    )
    assert file(user, *jobs[2], size=MIB, deposit=DEPOSIT).stored_bytes == 3 * MIB
    assert ledger_verify().consistent


def test_a_deposit_is_forfeited_when_the_audit_proves_nothing_and_returned_when_it_catches_a_cheat() -> None:
    user = make_wallet(user=make_user(), credits=10_000_000).user
    start = wallet_balance(user=user)
    job, ticket, backup_peer = job_of(user)
    after_hold = wallet_balance(user=user)
    fees_before = fees()
    for verdict in ("reporter_wrong", "backup_cheated", "inconclusive"):
        audit = file(user, job, ticket, backup_peer, deposit=DEPOSIT)
        assert wallet_balance(user=user) == after_hold - DEPOSIT
        audit = audit_verdict_record(audit_id=audit.pk, verdict=verdict, detail="")
        assert audit.deposit_state == "forfeited" and Hold.objects.get(pk=audit.deposit_hold_id).state == "closed"
        # Deciding again (a redelivered task) moves nothing more.
        audit_verdict_record(audit_id=audit.pk, verdict=verdict, detail="")
        after_hold -= DEPOSIT
        assert wallet_balance(user=user) == after_hold
    assert fees() == fees_before + 3 * DEPOSIT
    forfeits = Transaction.objects.filter(kind=Transaction.Kind.FORFEIT)
    assert forfeits.count() == 3 and all(sum(t.postings.values_list("amount", flat=True)) == 0 for t in forfeits)

    caught = audit_verdict_record(
        audit_id=file(user, job, ticket, backup_peer, deposit=DEPOSIT).pk,
        verdict="provider_cheated",
        detail="claimed output off by 3.1",
    )
    assert caught.deposit_state == "returned" and wallet_balance(user=user) == after_hold
    # The validator could not judge (no checkpoint): not the reporter's fault, the deposit comes back.
    unjudged = audit_verdict_record(
        audit_id=file(user, job, ticket, backup_peer, deposit=DEPOSIT).pk,
        verdict="inconclusive",
        detail="no validator checkpoint",
        validator_failed=True,
    )
    assert unjudged.deposit_state == "returned" and wallet_balance(user=user) == after_hold
    assert fees() == fees_before + 3 * DEPOSIT
    assert start - wallet_balance(user=user) == 1_000_000 + 3 * DEPOSIT  # the job's hold and three lost deposits
    assert ledger_verify().consistent


def test_evidence_or_a_deposit_is_required_even_from_staff_and_the_require_evidence_setting_wins(settings: Any) -> None:
    staff = make_wallet(user=make_user(is_staff=True), credits=10_000_000).user
    owner = make_wallet(user=make_user(), credits=10_000_000).user
    job, ticket, backup_peer = job_of(owner)
    with pytest.raises(ValidationFailed) as e:
        file(staff, job, ticket, backup_peer)
    assert e.value.code == "evidence_or_deposit_required"
    settings.HIVEMART_AUDIT_REQUIRE_EVIDENCE = True
    with pytest.raises(ValidationFailed) as e:
        file(owner, job, ticket, backup_peer, deposit=DEPOSIT)
    assert e.value.code == "evidence_required"
    assert not Audit.objects.exists()


def test_a_deposit_bigger_than_the_wallet_is_refused_and_holds_nothing() -> None:
    user = make_wallet(user=make_user(), credits=1_000_000 + DEPOSIT - 1).user
    job, ticket, backup_peer = job_of(user)
    with pytest.raises(InsufficientCredits):
        file(user, job, ticket, backup_peer, deposit=DEPOSIT)
    assert not Audit.objects.exists() and wallet_balance(user=user) == DEPOSIT - 1
    assert Hold.objects.filter(payer__user=user).count() == 1  # the job's only
