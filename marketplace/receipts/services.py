"""Writes for settlement: tickets, receipt uploads, settling receipts into the ledger, closing jobs.

Rules (docs/protocol.md, "Payment channel" and "Tickets and receipts"):

- **Tickets.** Storing a plan issues one ticket per (segment, provider), primaries and
  backups, signed with the platform key. What is left of the job's hold is split over the
  plan's segments (price x blocks); each segment's share (``spend_cap``) bounds what all its
  tickets, primary and backups, are paid together, so a job's tickets never promise more
  than its hold. A ticket states its credit window (``credit_units``).
- **Uploads.** A receipt is checked against its stored ticket (``verify_receipt``): provider
  signature, the ticket's job and provider, units within ``max_units``, and the client's
  countersignature when present. The newest receipt (highest ``seq``) per (ticket, session)
  is kept; a receipt not newer than the stored one is ``stale`` (a replay; harmless) unless
  it is countersigned, when its units still count as acknowledged (``acked_units``); a newer
  one with fewer units is refused (cumulative counts never go down). Who may upload: the
  job's owner (the client), the user who registered the provider the receipt names, staff.
- **Settlement.** Per ticket, across its sessions, the payable units are what the client
  countersigned plus at most the credit window of work only the provider signed for (no
  window while the client disputes a receipt of the ticket); ``cost(u) = ceil(u * price /
  1e6)`` on cumulative units, the fee ``floor(cost * fee_bps / 1e4)`` on the cumulative paid
  amount, so however settlement is split the provider amount and the fee are the same. One
  capture (``ledger.services.hold_capture``) per (job, provider) per run, never beyond the
  segment's share or what is left of the hold (the rest is recorded as a shortfall). Each
  (job, provider) is settled in one transaction under the job's row lock, so concurrent
  settlers pay once. Voided tickets are never paid.
- **Disputes.** A client that refuses a receipt reports it (``receipt_dispute``); staff
  decide (``dispute_verdict_record``), voiding and clawing back a cheating provider's work.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, Sum
from django.utils import timezone

from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.commitments import StepRecord, StepRecordError, equivocation
from hivemart_core.protocol.identity import public_key_from_peer_id, verify_signature
from hivemart_core.protocol.receipts import (
    SESSION_ID_PATTERN,
    ReceiptError,
    WorkReceipt,
    chain_next,
    chain_start,
    verify_receipt,
)
from hivemart_core.protocol.tickets import JobTicket, TicketError, issue_ticket
from marketplace.accounts.models import User
from marketplace.common.errors import Conflict, InvalidTransition, NotFound, PermissionDenied, ValidationFailed
from marketplace.jobs.models import TERMINAL_STATES, Job, Plan
from marketplace.jobs.services import job_transition, job_transition_request
from marketplace.ledger.models import Account, Hold, Posting
from marketplace.ledger.services import (
    MAX_AMOUNT,
    clawback,
    fee_for,
    hold_capture,
    hold_forfeit,
    hold_place,
    hold_release,
    wallet_get_or_create,
)
from marketplace.providers.models import Provider
from marketplace.providers.services import provider_reputation_lower, provider_suspend
from marketplace.receipts.models import UNSETTLED, Audit, Dispute, Offence, Receipt, Settlement, Ticket
from marketplace.receipts.platform import platform_identity

__all__ = [
    "MAX_RECEIPTS_PER_UPLOAD",
    "NO_CLIENT_KEY",
    "ReceiptOutcome",
    "SettleSummary",
    "ticket_cost",
    "tickets_issue_for_plan",
    "tickets_renew",
    "receipts_upload",
    "receipts_settle",
    "jobs_close_settled",
    "job_finish",
    "receipts_uploaded_hook_register",
    "job_settle_before_closing",
    "audit_create",
    "audit_created_hook_register",
    "audit_verdict_record",
    "provider_offence_record",
    "provider_job_void",
    "MAX_AUDIT_TENSOR_BYTES",
    "ticket_fee",
    "payable_units",
    "receipt_dispute",
    "dispute_verdict_record",
    "DISPUTE_CODES",
]

logger = logging.getLogger(__name__)

MAX_RECEIPTS_PER_UPLOAD = 500
# Bound into tickets of jobs created without a client key. The marketplace refuses client
# signatures on such tickets (a small-order key like this one must never vouch for anything).
NO_CLIENT_KEY = "00" * 32
_MAX_UNITS = 2**62
_PAYABLE_STATES = (Job.State.PLANNED, Job.State.RUNNING, Job.State.SETTLING)

# Called (inside the upload's transaction) with the ids of the jobs whose receipts were
# accepted; the scheduling app registers one that queues their settlement on commit.
_uploaded_hooks: list[Callable[[list[int]], None]] = []


def receipts_uploaded_hook_register(hook: Callable[[list[int]], None]) -> None:
    """Call ``hook(job_ids)`` after every upload that accepted at least one receipt."""
    if hook not in _uploaded_hooks:
        _uploaded_hooks.append(hook)


def ticket_cost(units: int, *, max_units: int, price: int) -> int:
    """Micro-credits owed for ``units`` cumulative work units on a ticket, rounded up: any
    work the client pays for pays its provider at least one micro-credit. Computed on
    cumulative units, so however a stream of receipts is split into settlements, the total
    is the same (docs/protocol.md, "Rounding")."""
    return -(-min(units, max_units) * price // 1_000_000)


def ticket_fee(amount: int) -> int:
    """The platform's fee on a ticket's cumulative paid ``amount`` (rounded down, in the
    provider's favour). A capture's fee is the increase of this over the capture, so the
    fee does not depend on how settlement was split."""
    return fee_for(amount, settings.HIVEMART_PLATFORM_FEE_BPS)


def payable_units(*, units: int, acked_units: int, credit_units: int, max_units: int) -> int:
    """Work units a ticket is paid for: everything the client countersigned, and beyond it at
    most ``credit_units`` of work only the provider signed for (0 while it is disputed)."""
    return min(max_units, max(acked_units, min(units, acked_units + credit_units)))


# --- tickets ---------------------------------------------------------------------------------


def _units_for(amount: int, price: int) -> int:
    """The most work units ``amount`` micro-credits buy at ``price`` (``ticket_cost`` rounds up)."""
    if price <= 0:
        return _MAX_UNITS
    return min(amount * 1_000_000 // price, _MAX_UNITS)


def _segment_shares(budget: int, weights: list[int]) -> list[int]:
    """Split ``budget`` over segments in proportion to ``weights`` (price x blocks: what a token
    through the whole chain costs in each), rounding down, so the shares never exceed it."""
    total = sum(weights)
    if total <= 0:
        return [budget // max(len(weights), 1)] * len(weights)
    return [budget * w // total for w in weights]


def _plan_budget(job: Job, plan: Plan) -> int:
    """What the job's hold can still promise to ``plan``'s tickets: what is left of the hold,
    less what the tickets of earlier plans may still be paid. Those are capped first at what
    they have been paid plus what their uploaded receipts and credit windows can still claim,
    so a new plan (a replan, a failover) is funded from the rest."""
    left = Account.objects.filter(pk=job.hold.escrow_id).values_list("balance", flat=True).get()
    earlier = list(
        Ticket.objects.filter(job=job, voided_at__isnull=True).exclude(plan=plan).select_for_update(of=("self",))
    )
    if not earlier:
        return left
    sums = {
        row["ticket_id"]: row
        for row in Receipt.objects.filter(ticket__in=earlier)
        .values("ticket_id")
        .annotate(units=Sum("units"), acked=Sum("acked_units"))
    }
    pools: dict[tuple[int, int], list[Ticket]] = defaultdict(list)
    for t in earlier:
        pools[(t.plan_id, t.segment)].append(t)
    outstanding = 0
    for tickets in pools.values():
        claim = paid = 0
        for t in tickets:
            row = sums.get(t.pk, {"units": 0, "acked": 0})
            units = payable_units(
                units=row["units"] or 0,
                acked_units=row["acked"] or 0,
                credit_units=t.credit_units,
                max_units=t.max_units,
            )
            claim += max(
                ticket_cost(units, max_units=t.max_units, price=t.price),
                t.settled_amount + ticket_cost(t.credit_units, max_units=t.max_units, price=t.price),
            )
            paid += t.settled_amount
        cap = tickets[0].spend_cap
        frozen = max(paid, claim if cap is None else min(cap, claim))
        if cap is None or frozen < cap:
            Ticket.objects.filter(pk__in=[t.pk for t in tickets]).update(spend_cap=frozen)
        outstanding += frozen - paid
    return max(0, left - outstanding)


# Probe tickets name this job id, which no real job reaches (ids are sequential from 1). A
# provider could tell probes from jobs by it; what it cannot do is serve them without
# computing, since their answers are checked against the platform's own recomputation.
PROBE_JOB_ID = 2**53
PROBE_TICKET_TTL_S = 600


def ticket_issue_for_probe(*, provider: Provider, max_units: int) -> dict[str, Any]:
    """A signed, unpaid (price 0), unstored ticket for the scheduler's probe of ``provider``:
    providers that sell through the marketplace refuse unticketed forwards. Receipts for it
    are refused at upload, since no job owns it."""
    if max_units < 1:
        raise ValidationFailed("a probe ticket needs at least one work unit")
    expires_at = int((timezone.now() + timedelta(seconds=PROBE_TICKET_TTL_S)).timestamp())
    signed = issue_ticket(
        platform_identity(),
        ticket_id=f"probe_{secrets.token_urlsafe(12)}",
        job_id=PROBE_JOB_ID,
        client_key=secrets.token_bytes(32).hex(),
        provider_peer=provider.peer_id,
        model_id=provider.model.model_id,
        model_digest=provider.model.weights_digest,
        start=provider.block_start,
        end=provider.block_end,
        max_units=max_units,
        price=0,
        expires_at=expires_at,
        credit_units=max_units,
    )
    return signed.to_dict()


def tickets_issue_for_plan(plan: Plan) -> list[Ticket]:
    """Issue and store a signed ticket for every primary and backup of ``plan``.

    Runs inside ``job_plan_store``'s transaction (registered as its plan hook), so a plan
    never exists without its tickets. Also used to renew a plan's tickets before they expire.
    """
    job = Job.objects.select_related("model", "hold").get(pk=plan.job_id)
    identity = platform_identity()
    # A provider caught cheating on this job gets no new tickets for it.
    voided = set(Ticket.objects.filter(job=job, voided_at__isnull=False).values_list("provider_id", flat=True))
    expires_at = int((timezone.now() + timedelta(seconds=settings.HIVEMART_TICKET_TTL)).timestamp())
    segments = list(plan.segments.select_related("provider").prefetch_related("backups__provider").order_by("index"))
    # Renewing keeps the plan's segment shares (its pools); a new plan splits what is left.
    caps = dict(Ticket.objects.filter(plan=plan).values_list("segment", "spend_cap").distinct())
    if len(caps) < len(segments):
        shares = _segment_shares(
            _plan_budget(job, plan), [seg.price * (seg.block_end - seg.block_start) for seg in segments]
        )
        caps = {seg.index: share for seg, share in zip(segments, shares, strict=False)}
    rows = []
    for seg in segments:
        slots = [(Ticket.Role.PRIMARY, 0, seg.provider, seg.price)]
        slots += [(Ticket.Role.BACKUP, b.rank, b.provider, b.price) for b in seg.backups.all()]
        cap = caps[seg.index]
        for role, rank, provider, price in slots:
            if provider.pk in voided:
                continue
            # Primary and backups of a segment are alternatives for the same work: each may be
            # paid up to the segment's share, all of them together too (spend_cap).
            max_units = max(1, _units_for(cap if cap is not None else job.budget, price))
            credit = min(max_units, settings.HIVEMART_CREDIT_WINDOW_TOKENS * (seg.block_end - seg.block_start))
            signed = issue_ticket(
                identity,
                ticket_id=secrets.token_urlsafe(18),
                job_id=job.pk,
                client_key=job.client_key or NO_CLIENT_KEY,
                provider_peer=provider.peer_id,
                model_id=job.model.model_id,
                model_digest=job.model.weights_digest,
                start=seg.block_start,
                end=seg.block_end,
                max_units=max_units,
                price=price,
                expires_at=expires_at,
                credit_units=credit,
            )
            rows.append(
                Ticket(
                    ticket_id=signed.ticket_id,
                    job=job,
                    plan=plan,
                    segment=seg.index,
                    role=role,
                    rank=rank,
                    provider=provider,
                    block_start=seg.block_start,
                    block_end=seg.block_end,
                    price=price,
                    max_units=signed.max_units,
                    credit_units=credit,
                    spend_cap=cap,
                    expires_at=datetime.fromtimestamp(expires_at, tz=UTC),
                    signed=signed.to_dict(),
                )
            )
    return Ticket.objects.bulk_create(rows)


@transaction.atomic
def tickets_renew(*, job: Job, by: User) -> list[Ticket]:
    """Fresh tickets (new ids, new expiry) for the job's current plan; the old ones stay
    payable for the work they covered. Owner or staff; the job must still be able to run."""
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)
    if not by.is_staff and job.user_id != by.pk:
        raise PermissionDenied("this is not your job")
    if job.state not in _PAYABLE_STATES:
        raise InvalidTransition(f"a {job.state} job gets no new tickets", extra={"state": job.state})
    plan = job.plans.order_by("-version").first()
    if plan is None:
        raise Conflict("this job has no plan yet", code="no_plan")
    return tickets_issue_for_plan(plan)


# --- uploads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiptOutcome:
    """What became of one uploaded receipt: ``accepted``, ``stale`` or ``rejected`` (with ``code``)."""

    status: str
    code: str = ""
    message: str = ""
    ticket_id: str = ""
    session_id: str = ""
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "ticket_id": self.ticket_id,
            "session_id": self.session_id,
            "seq": self.seq,
        }


def _rejected(code: str, message: str, data: Any) -> ReceiptOutcome:
    tid = data.get("ticket_id") if isinstance(data, dict) else None
    sid = data.get("session_id") if isinstance(data, dict) else None
    seq = data.get("seq") if isinstance(data, dict) else None
    return ReceiptOutcome(
        "rejected",
        code,
        message,
        tid if isinstance(tid, str) else "",
        sid if isinstance(sid, str) else "",
        seq if type(seq) is int else 0,
    )


def _check_receipt(data: Any, ticket: Ticket | None, parsed: dict[int, JobTicket], user: User) -> WorkReceipt:
    if ticket is None:
        raise ReceiptError("no such ticket", code="receipt_ticket")
    if not (user.is_staff or ticket.job.user_id == user.pk or ticket.provider.user_id == user.pk):
        raise ReceiptError(
            "only the job's client or the provider it names may upload this receipt", code="permission_denied"
        )
    if ticket.voided_at is not None:
        raise ReceiptError("this ticket was voided by an audit; its work is not paid", code="receipt_voided")
    if ticket.job.state in TERMINAL_STATES:
        raise ReceiptError(f"job #{ticket.job_id} is {ticket.job.state}; it takes no more receipts", code="job_closed")
    job_ticket = parsed.get(ticket.pk)
    if job_ticket is None:
        try:
            job_ticket = parsed[ticket.pk] = JobTicket.from_dict(ticket.signed)
        except TicketError as e:  # our own stored ticket: a bug, but never pay on it
            raise ReceiptError(f"stored ticket is unreadable: {e}", code="receipt_ticket") from e
    receipt = verify_receipt(data, job_ticket)
    if receipt.client_signature and not ticket.job.client_key:
        raise ReceiptError(
            "this job has no client key, so its receipts cannot be countersigned", code="client_signature"
        )
    return receipt


_COLUMNS = (
    "ticket_id, session_id, seq, units, steps, chain, issued_at, provider_signature, client_signature, "
    "settled_units, uploaded_by_id, updated_at, acked_units, settled_acked"
)
# The WHERE clause re-applies the newer-and-not-fewer rule inside the database, so that
# concurrent uploads cannot regress a stored receipt; RETURNING says which rows were written.
_ON_CONFLICT = """
ON CONFLICT (ticket_id, session_id) DO UPDATE SET
    seq = excluded.seq, units = excluded.units, steps = excluded.steps, chain = excluded.chain,
    issued_at = excluded.issued_at, provider_signature = excluded.provider_signature,
    client_signature = excluded.client_signature, uploaded_by_id = excluded.uploaded_by_id,
    updated_at = excluded.updated_at, acked_units = {greatest}(receipts_receipt.acked_units, excluded.acked_units)
WHERE (excluded.seq > receipts_receipt.seq AND excluded.units >= receipts_receipt.units)
   OR (excluded.seq = receipts_receipt.seq AND excluded.units = receipts_receipt.units
       AND excluded.chain = receipts_receipt.chain AND receipts_receipt.client_signature = ''
       AND excluded.client_signature <> '')
RETURNING ticket_id, session_id
"""
# PostgreSQL: one array per column, so a batch of 500 is 12 parameters, not 6,000.
_UNNEST = (
    "SELECT * FROM unnest(%s::bigint[], %s::varchar[], %s::bigint[], %s::bigint[], %s::bigint[], "
    "%s::varchar[], %s::bigint[], %s::varchar[], %s::varchar[], %s::bigint[], %s::bigint[], "
    "%s::timestamptz[], %s::bigint[], %s::bigint[])"
)
# A countersigned receipt older than the stored one still acknowledges its units (a provider
# cannot hide the client's countersignatures by uploading newer receipts of its own first).
_RAISE_ACKS_POSTGRES = (
    "UPDATE receipts_receipt r SET acked_units = a.units, updated_at = %s "
    "FROM unnest(%s::bigint[], %s::varchar[], %s::bigint[]) AS a (ticket_id, session_id, units) "
    "WHERE r.ticket_id = a.ticket_id AND r.session_id = a.session_id AND r.acked_units < a.units"
)
_RAISE_ACKS = (
    "UPDATE receipts_receipt SET acked_units = %s, updated_at = %s "
    "WHERE ticket_id = %s AND session_id = %s AND acked_units < %s"
)


def _store(rows: list[tuple[int, WorkReceipt]], user: User) -> set[tuple[int, str]]:
    """Upsert receipts (see ``_ON_CONFLICT``); returns the (ticket pk, session) keys written."""
    if not rows:
        return set()
    now = timezone.now()
    records = [
        (
            ticket_pk,
            r.session_id,
            r.seq,
            r.units,
            r.steps,
            r.chain,
            r.issued_at,
            r.provider_signature,
            r.client_signature,
            0,
            user.pk,
            now,
            r.units if r.client_signature else 0,
            0,
        )
        for ticket_pk, r in rows
    ]
    if connection.vendor == "postgresql":
        sql = f"INSERT INTO receipts_receipt ({_COLUMNS}) {_UNNEST} {_ON_CONFLICT.format(greatest='GREATEST')}"
        params: list[Any] = [list(column) for column in zip(*records, strict=False)]
    else:
        sql = f"INSERT INTO receipts_receipt ({_COLUMNS}) VALUES {','.join(['(%s' + ',%s' * 13 + ')'] * len(records))}"
        sql += _ON_CONFLICT.format(greatest="MAX")
        params = [value for record in records for value in record]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {(t, s) for t, s in cursor.fetchall()}


def _raise_acks(acks: dict[tuple[int, str], int]) -> None:
    """Record countersigned units of receipts older than the stored ones (see ``_RAISE_ACKS``)."""
    if not acks:
        return
    now = timezone.now()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            keys = sorted(acks)
            cursor.execute(
                _RAISE_ACKS_POSTGRES, [now, [k[0] for k in keys], [k[1] for k in keys], [acks[k] for k in keys]]
            )
        else:
            cursor.executemany(_RAISE_ACKS, [(units, now, t, sid, units) for (t, sid), units in sorted(acks.items())])


@transaction.atomic
def receipts_upload(*, user: User, receipts: Sequence[Any]) -> list[ReceiptOutcome]:
    """Check and store a batch of receipts (at most ``MAX_RECEIPTS_PER_UPLOAD``); one outcome
    per receipt, in order. A countersigned receipt also raises its session's acknowledged
    units, even when a newer receipt is stored. Nothing here moves credits:
    :func:`receipts_settle` does."""
    if not isinstance(receipts, (list, tuple)) or not 0 < len(receipts) <= MAX_RECEIPTS_PER_UPLOAD:
        raise ValidationFailed(f"send 1 to {MAX_RECEIPTS_PER_UPLOAD} receipts", extra={"field": "receipts"})
    ticket_ids = {d["ticket_id"] for d in receipts if isinstance(d, dict) and isinstance(d.get("ticket_id"), str)}
    tickets = {
        t.ticket_id: t for t in Ticket.objects.select_related("job", "provider").filter(ticket_id__in=ticket_ids)
    }
    parsed: dict[int, JobTicket] = {}
    outcomes: list[ReceiptOutcome | None] = [None] * len(receipts)
    candidates: list[tuple[int, Ticket, WorkReceipt]] = []
    for i, data in enumerate(receipts):
        tid = data.get("ticket_id") if isinstance(data, dict) else None
        ticket = tickets.get(tid) if isinstance(tid, str) else None  # an object or a list is no ticket id
        try:
            candidates.append((i, ticket, _check_receipt(data, ticket, parsed, user)))
        except ReceiptError as e:
            outcomes[i] = _rejected(e.code, str(e), data)

    keys = {(t.pk, r.session_id) for _, t, r in candidates}
    state: dict[tuple[int, str], tuple[int, int, str, str]] = {}
    acked: dict[tuple[int, str], int] = {}
    if keys:
        stored = Receipt.objects.filter(
            ticket_id__in={k[0] for k in keys}, session_id__in={k[1] for k in keys}
        ).values_list("ticket_id", "session_id", "seq", "units", "chain", "client_signature", "acked_units")
        state = {(t, s): (seq, units, chain, csig) for t, s, seq, units, chain, csig, _ in stored if (t, s) in keys}
        acked = {(t, s): a for t, s, _, _, _, _, a in stored if (t, s) in keys}
    winners: dict[tuple[int, str], tuple[int, WorkReceipt]] = {}
    acks: dict[tuple[int, str], int] = {}
    for i, ticket, r in sorted(candidates, key=lambda c: (c[1].pk, c[2].session_id, c[2].seq)):
        key = (ticket.pk, r.session_id)
        ident = dict(ticket_id=r.ticket_id, session_id=r.session_id, seq=r.seq)
        current = state.get(key)
        if current is not None:
            seq, units, chain, csig = current
            countersigns = r.seq == seq and r.units == units and r.chain == chain and not csig and r.client_signature
            if r.seq <= seq and not countersigns:
                if r.client_signature and r.units > max(acked.get(key, 0), acks.get(key, 0)):
                    acks[key] = r.units
                    outcomes[i] = ReceiptOutcome(
                        "accepted", "", f"older than the stored #{seq}; its countersigned units are recorded", **ident
                    )
                    continue
                outcomes[i] = ReceiptOutcome("stale", "receipt_replay", f"not newer than the stored #{seq}", **ident)
                continue
            if r.units < units:
                outcomes[i] = ReceiptOutcome(
                    "rejected", "receipt_units", f"{r.units} units is fewer than the {units} of receipt #{seq}", **ident
                )
                continue
        state[key] = (r.seq, r.units, r.chain, r.client_signature)
        previous = winners.get(key)
        if previous is not None and previous[1].client_signature:  # superseded in this batch: keep its ack
            acks[key] = max(acks.get(key, 0), previous[1].units)
        winners[key] = (i, r)
        outcomes[i] = ReceiptOutcome("accepted", **ident)
    written = _store([(key[0], r) for key, (_, r) in winners.items()], user)
    for key, (i, r) in winners.items():
        if key not in written:  # a concurrent upload stored a newer receipt first
            outcomes[i] = ReceiptOutcome(
                "stale",
                "receipt_replay",
                "a newer receipt was stored meanwhile",
                ticket_id=r.ticket_id,
                session_id=r.session_id,
                seq=r.seq,
            )
            if r.client_signature:  # still an acknowledgement
                acks[key] = max(acks.get(key, 0), r.units)
    _raise_acks(acks)
    if written or acks:
        changed = {key[0] for key in written} | {key[0] for key in acks}
        job_ids = sorted({t.job_id for t in tickets.values() if t.pk in changed})
        for hook in _uploaded_hooks:
            hook(job_ids)
    return [o for o in outcomes if o is not None]


# --- settlement ------------------------------------------------------------------------------


@dataclass
class SettleSummary:
    """One settlement run: receipts settled, micro-credits captured and owed beyond holds,
    (job, provider) groups paid, jobs closed."""

    receipts: int = 0
    captured: int = 0
    shortfall: int = 0
    groups: int = 0
    closed: list[int] = field(default_factory=list)

    def add(self, other: SettleSummary) -> None:
        self.receipts += other.receipts
        self.captured += other.captured
        self.shortfall += other.shortfall
        self.groups += other.groups

    def to_dict(self) -> dict[str, Any]:
        return {
            "receipts": self.receipts,
            "captured": self.captured,
            "shortfall": self.shortfall,
            "groups": self.groups,
            "closed": self.closed,
        }


def _unsettled() -> Any:
    return Receipt.objects.filter(UNSETTLED, ticket__voided_at__isnull=True)


def _settle_key(receipts: Sequence[Receipt], tickets: dict[int, Ticket]) -> str:
    digest = hashlib.sha256()
    for r in sorted(receipts, key=lambda r: (tickets[r.ticket_id].ticket_id, r.session_id)):
        digest.update(f"{tickets[r.ticket_id].ticket_id}/{r.session_id}/{r.units}/{r.acked_units}\n".encode())
    return digest.hexdigest()[:40]


def _pool_paid(tickets: dict[int, Ticket]) -> dict[tuple[int, int], int]:
    """Micro-credits paid so far to each plan segment (pool) the ``tickets`` belong to, by all
    of its tickets: ``spend_cap`` bounds the pool's total, whichever provider did the work."""
    capped = {(t.plan_id, t.segment) for t in tickets.values() if t.spend_cap is not None}
    if not capped:
        return {}
    paid: dict[tuple[int, int], int] = defaultdict(int)
    rows = Ticket.objects.filter(plan_id__in={k[0] for k in capped}, segment__in={k[1] for k in capped}).values_list(
        "plan_id", "segment", "settled_amount"
    )
    for plan_id, segment, amount in rows:
        if (plan_id, segment) in capped:
            paid[(plan_id, segment)] += amount
    return paid


@transaction.atomic
def receipt_group_settle(*, job_id: int, provider_id: int, start_planned: bool = True) -> SettleSummary:
    """Pay ``provider_id`` for its unsettled receipts on ``job_id``: one capture, under the
    job's row lock (which every settler of this job takes first, so two settle it once).
    Receipts of a planned job move it to running unless ``start_planned`` is False."""
    summary = SettleSummary()
    job = Job.objects.select_for_update(of=("self",)).select_related("hold__escrow").filter(pk=job_id).first()
    if job is None or job.state not in _PAYABLE_STATES:
        return summary
    # Tickets change only under this job's lock (settlement, voiding), so reading them with the
    # receipts is enough; the receipts themselves are locked against concurrent uploads.
    receipts = list(
        _unsettled()
        .select_for_update(of=("self",))
        .select_related("ticket__provider__earnings_account")
        .filter(ticket__job_id=job_id, ticket__provider_id=provider_id)
        .order_by("pk")
    )
    if not receipts:
        return summary
    if job.state == Job.State.PLANNED and start_planned:
        job_transition(job=job, to_state=Job.State.RUNNING, reason="work receipts arrived")
    tickets = {r.ticket_id: r.ticket for r in receipts}
    units = 0
    for r in receipts:
        units += r.units - r.settled_units
        tickets[r.ticket_id].settled_units += r.units - r.settled_units
        tickets[r.ticket_id].acked_units += r.acked_units - r.settled_acked
    Receipt.objects.filter(pk__in=[r.pk for r in receipts]).update(
        settled_units=F("units"), settled_acked=F("acked_units")
    )
    return _pay(job, provider_id, tickets, units=units, key=_settle_key(receipts, tickets), nreceipts=len(receipts))


def _pay(
    job: Job, provider_id: int, tickets: dict[int, Ticket], *, units: int, key: str, nreceipts: int
) -> SettleSummary:
    """Pay what ``tickets`` (of one provider, accumulators up to date) are now owed: one
    capture with the fee on cumulative amounts; caller holds the job's lock."""
    pools = _pool_paid(tickets)
    # Only settlement (and clawbacks, which add) touch this hold, under the job lock we hold.
    left = job.hold.escrow.balance if job.hold.state == Hold.State.OPEN else 0
    owed = amount = fee = 0
    for ticket in tickets.values():
        pay, short = _ticket_due(ticket, pools, left - amount)
        if pay:
            fee += ticket_fee(ticket.settled_amount + pay) - ticket_fee(ticket.settled_amount)
            ticket.settled_amount += pay
            amount += pay
        owed += pay + short
    Ticket.objects.bulk_update(tickets.values(), ["settled_units", "acked_units", "settled_amount"])
    tx = None
    if amount > 0:
        provider = next(iter(tickets.values())).provider
        tx = hold_capture(
            hold=job.hold,
            amount=amount,
            fee=fee,
            payee=provider.earnings_account,
            idempotency_key=f"job:{job.pk}:settle:{provider_id}:{key}",
            memo=f"job #{job.pk}: {units} work units",
        )
    if owed > 0:
        Settlement.objects.create(
            job=job, provider_id=provider_id, units=units, amount=amount, shortfall=owed - amount, transaction=tx
        )
        if owed > amount:
            logger.warning(
                "job #%s owes provider %s %s micro-credits beyond its hold", job.pk, provider_id, owed - amount
            )
    return SettleSummary(receipts=nreceipts, captured=amount, shortfall=owed - amount, groups=1)


def _ticket_due(ticket: Ticket, pools: dict[tuple[int, int], int], hold_left: int) -> tuple[int, int]:
    """(pay now, owed but beyond the segment's share or the hold) for one ticket whose
    accumulated ``settled_units``/``acked_units`` were just updated; updates ``pools``."""
    credit = 0 if ticket.disputed_at is not None else ticket.credit_units
    units = payable_units(
        units=ticket.settled_units, acked_units=ticket.acked_units, credit_units=credit, max_units=ticket.max_units
    )
    due = ticket_cost(units, max_units=ticket.max_units, price=ticket.price) - ticket.settled_amount
    if due <= 0:
        return 0, 0
    pay = min(due, max(0, hold_left))
    if ticket.spend_cap is not None:
        pool = (ticket.plan_id, ticket.segment)
        pay = min(pay, max(0, ticket.spend_cap - pools[pool]))
        pools[pool] += pay
    return pay, due - pay


def job_settle_before_closing(job: Job) -> None:
    """Settle a job's uploaded receipts before it is done, failed or cancelled (the jobs app's
    closing hook): cancelling or failing a job never skips paying for work already done."""
    if job.state not in _PAYABLE_STATES:
        return
    providers = set(_unsettled().filter(ticket__job_id=job.pk).values_list("ticket__provider_id", flat=True))
    for provider_id in sorted(providers):
        # The job is mid-transition (the caller holds its lock): no planned -> running here.
        receipt_group_settle(job_id=job.pk, provider_id=provider_id, start_planned=False)


def jobs_close_settled(*, now: datetime | None = None) -> list[int]:
    """Settling jobs with nothing left to settle, idle for ``HIVEMART_SETTLE_GRACE_S`` (time for
    late uploads), become done, which releases what is left of their holds."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.HIVEMART_SETTLE_GRACE_S)
    pending = _unsettled().filter(ticket__job_id=OuterRef("pk"))
    closed = []
    for pk in (
        Job.objects.filter(state=Job.State.SETTLING, updated_at__lte=cutoff)
        .exclude(Exists(pending))
        .values_list("pk", flat=True)
    ):
        with transaction.atomic():
            job = Job.objects.select_for_update(of=("self",)).filter(pk=pk, state=Job.State.SETTLING).first()
            if job is None or _unsettled().filter(ticket__job_id=pk).exists():
                continue
            job_transition(job=job, to_state=Job.State.DONE, reason="settled")
        closed.append(pk)
    return closed


def receipts_settle(
    *, job_ids: Sequence[int] | None = None, close: bool = True, now: datetime | None = None
) -> SettleSummary:
    """Settle every (job, provider) with unsettled receipts (of ``job_ids`` when given), each
    in its own transaction, then close settling jobs that are finished. Idempotent: run it
    as often as you like, from as many workers as you like."""
    groups = _unsettled().filter(ticket__job__state__in=_PAYABLE_STATES)
    if job_ids is not None:
        groups = groups.filter(ticket__job_id__in=list(job_ids))
    summary = SettleSummary()
    for job_id, provider_id in sorted(set(groups.values_list("ticket__job_id", "ticket__provider_id"))):
        summary.add(receipt_group_settle(job_id=job_id, provider_id=provider_id))
    if close:
        summary.closed = jobs_close_settled(now=now)
    return summary


# --- finishing -------------------------------------------------------------------------------


def job_finish(*, job: Job, by: User, receipts: Sequence[Any] = ()) -> tuple[Job, list[ReceiptOutcome]]:
    """The client is done: upload its last receipts (optional) and move the job to settling
    (through running when it never started). Settlement pays what is owed and closes it."""
    outcomes = receipts_upload(user=by, receipts=receipts) if receipts else []
    with transaction.atomic():
        if job.state == Job.State.PLANNED:
            job = job_transition_request(job=job, by=by, to_state=Job.State.RUNNING, reason="finishing")
        job = job_transition_request(job=job, by=by, to_state=Job.State.SETTLING, reason="finished by the client")
    grouped: dict[str, int] = defaultdict(int)
    for o in outcomes:
        grouped[o.status] += 1
    logger.info("job #%s finished; final receipts %s", job.pk, dict(grouped))
    return job, outcomes


# --- disputes --------------------------------------------------------------------------------

DISPUTE_CODES = ("receipt_units", "receipt_chain", "receipt_replay", "receipt_ticket", "receipt_missing")
# A job's open disputes at once: each stores one receipt, so this bounds what a client can store.
MAX_OPEN_DISPUTES_PER_JOB = 64


@transaction.atomic
def receipt_dispute(*, user: User, job: Job, receipt: Any, code: str, message: str = "") -> tuple[Dispute, bool]:
    """The job's client refused to countersign ``receipt`` (a provider-signed receipt of one of
    the job's tickets) because it failed check ``code``. Until staff decide the dispute
    (:func:`dispute_verdict_record`), the ticket's credit window is not paid: its provider is
    paid only for what the client countersigned. Returns (dispute, created); reporting the
    same receipt again returns the first dispute."""
    if not user.is_staff and job.user_id != user.pk:
        raise PermissionDenied("only the job's client may dispute its receipts")
    if code not in DISPUTE_CODES:
        raise ValidationFailed(f"code is one of {', '.join(DISPUTE_CODES)}", extra={"field": "code"})
    if not isinstance(message, str) or len(message) > 300:
        raise ValidationFailed("message is at most 300 characters", extra={"field": "message"})
    try:
        parsed = WorkReceipt.from_dict(receipt)
    except ReceiptError as e:
        raise ValidationFailed(f"receipt: {e}", extra={"field": "receipt"}, code="bad_receipt") from None
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)  # settlement's lock: no payment races this
    ticket = Ticket.objects.select_related("provider").filter(job=job, ticket_id=parsed.ticket_id).first()
    if ticket is None or parsed.job_id != job.pk or parsed.provider_peer != ticket.provider.peer_id:
        raise NotFound(
            f"job #{job.pk} has no ticket {parsed.ticket_id} of {parsed.provider_peer}", extra={"field": "receipt"}
        )
    try:
        key = public_key_from_peer_id(parsed.provider_peer)
    except ProtocolError:
        key = None
    if key is None or not verify_signature(key, parsed.signing_bytes(), bytes.fromhex(parsed.provider_signature)):
        raise ValidationFailed(
            "the receipt is not signed by the provider it names", extra={"field": "receipt"}, code="receipt_signature"
        )
    if parsed.client_signature:
        raise ValidationFailed(
            "this receipt carries a countersignature: send the receipt the provider signed, as you refused it",
            extra={"field": "receipt"},
            code="client_signature",
        )
    existing = Dispute.objects.filter(ticket=ticket, session_id=parsed.session_id, seq=parsed.seq).first()
    if existing is not None:
        return existing, False
    if job.state in TERMINAL_STATES:
        raise InvalidTransition(f"job #{job.pk} is {job.state}; it was settled", extra={"state": job.state})
    if Dispute.objects.filter(job=job, state=Dispute.State.OPEN).count() >= MAX_OPEN_DISPUTES_PER_JOB:
        raise Conflict(f"job #{job.pk} already has {MAX_OPEN_DISPUTES_PER_JOB} open disputes", code="too_many_disputes")
    dispute = Dispute.objects.create(
        job=job,
        ticket=ticket,
        provider=ticket.provider,
        reporter=user,
        session_id=parsed.session_id,
        seq=parsed.seq,
        units=parsed.units,
        code=code,
        message=message,
        receipt=parsed.to_dict(),
    )
    Ticket.objects.filter(pk=ticket.pk, disputed_at__isnull=True).update(disputed_at=timezone.now())
    logger.warning(
        "job #%s: the client disputes receipt %s/%s#%s of provider %s (%s)",
        job.pk,
        ticket.ticket_id,
        parsed.session_id,
        parsed.seq,
        ticket.provider_id,
        code,
    )
    return dispute, True


@transaction.atomic
def dispute_verdict_record(*, dispute_id: int, verdict: str, detail: str) -> Dispute:
    """Decide a dispute (staff, like an audit's verdict). ``provider_cheated``: the provider's
    work on the job is voided and clawed back and the offence recorded (as a failed audit);
    otherwise, once the ticket has no open dispute left, its credit window is paid again."""
    if verdict not in Audit.Verdict.values:
        raise ValidationFailed(f"verdict is one of {', '.join(Audit.Verdict.values)}", extra={"field": "verdict"})
    job_id = Dispute.objects.filter(pk=dispute_id).values_list("job_id", flat=True).first()
    if job_id is None:
        raise NotFound(f"no dispute {dispute_id}")
    job = Job.objects.select_for_update(of=("self",)).select_related("hold__escrow").get(pk=job_id)
    dispute = Dispute.objects.select_for_update().select_related("provider", "ticket").get(pk=dispute_id)
    if dispute.state == Dispute.State.DECIDED:
        return dispute
    dispute.state, dispute.verdict, dispute.detail, dispute.decided_at = (
        Dispute.State.DECIDED,
        verdict,
        detail[:500],
        timezone.now(),
    )
    dispute.save(update_fields=["state", "verdict", "detail", "decided_at"])
    if verdict == Audit.Verdict.PROVIDER_CHEATED:
        provider_job_void(job=job, provider=dispute.provider)
        if not Offence.objects.filter(provider=dispute.provider, job=job, kind=Offence.Kind.AUDIT).exists():
            provider_offence_record(
                provider=dispute.provider,
                kind=Offence.Kind.AUDIT,
                job=job,
                detail=f"dispute #{dispute.pk} of job #{job.pk}: {detail}",
            )
        return dispute
    if not Dispute.objects.filter(ticket=dispute.ticket, state=Dispute.State.OPEN).exists():
        Ticket.objects.filter(pk=dispute.ticket_id).update(disputed_at=None)
        if job.state in _PAYABLE_STATES and dispute.ticket.voided_at is None:
            ticket = Ticket.objects.select_related("provider__earnings_account").get(pk=dispute.ticket_id)
            _pay(job, ticket.provider_id, {ticket.pk: ticket}, units=0, key=f"dispute-{dispute.pk}", nreceipts=0)
    return dispute


# --- audits, offences, voiding -------------------------------------------------------------------

MAX_AUDIT_TENSOR_BYTES = 8 * 1024 * 1024
AUDIT_DTYPES = ("float32", "float16", "bfloat16")
# Audits cost the validator real compute; a job may have this many waiting at once.
MAX_OPEN_AUDITS_PER_JOB = 16

_audit_hooks: list[Callable[[int], None]] = []


def audit_created_hook_register(hook: Callable[[int], None]) -> None:
    """Call ``hook(audit_id)`` inside the transaction that files an audit (the scheduling
    app queues ``audit_decide`` on commit)."""
    if hook not in _audit_hooks:
        _audit_hooks.append(hook)


def _check_tensor_blob(name: str, blob: bytes) -> None:
    if not isinstance(blob, (bytes, bytearray)) or not 0 < len(blob) <= MAX_AUDIT_TENSOR_BYTES:
        raise ValidationFailed(
            f"{name} is an encoded tensor message of 1 byte to {MAX_AUDIT_TENSOR_BYTES} bytes", extra={"field": name}
        )


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_EVIDENCE_STEPS = 65_536
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def framed_tensor_digest(blob: bytes) -> bytes:
    """``tensor_digest`` of the one tensor in an ``encode_message({}, [tensor])`` byte string,
    computed from the frames without torch (the web process does not load it)."""

    def frame(offset: int) -> tuple[bytes, int]:
        if offset + 8 > len(blob):
            raise ValueError("truncated frame")
        length = int.from_bytes(blob[offset : offset + 8], "big")
        if offset + 8 + length > len(blob):
            raise ValueError("truncated frame")
        return blob[offset + 8 : offset + 8 + length], offset + 8 + length

    head, offset = frame(0)
    decoded = msgpack.unpackb(head, raw=False, strict_map_key=True)
    descriptors = decoded.get("t") if isinstance(decoded, dict) else None
    if not (
        isinstance(descriptors, list)
        and len(descriptors) == 1
        and isinstance(descriptors[0], list)
        and len(descriptors[0]) == 2
        and descriptors[0][0] in _ITEMSIZE
        and isinstance(descriptors[0][1], list)
        and all(type(d) is int and 0 <= d < 2**31 for d in descriptors[0][1])
    ):
        raise ValueError("expected one floating-point tensor")
    dtype, shape = descriptors[0]
    numel = 1
    for d in shape:
        numel *= d
    digest = hashlib.sha256(f"{dtype}:{','.join(map(str, shape))}\n".encode())
    remaining = numel * _ITEMSIZE[dtype]
    while remaining > 0:
        chunk, offset = frame(offset)
        if not chunk or len(chunk) > remaining:
            raise ValueError("tensor frames do not match the tensor's size")
        digest.update(chunk)
        remaining -= len(chunk)
    if offset != len(blob):
        raise ValueError("trailing bytes")
    return digest.digest()


def _check_evidence(evidence: Any, ticket: Ticket, session_id: str, claimed: bytes) -> None:
    """The claimed output is step ``step`` of a session whose provider-signed receipt commits,
    through its hash chain, to the client's ``digests`` of every output. Raises ValidationFailed."""

    def bad(message: str) -> ValidationFailed:
        return ValidationFailed(f"evidence: {message}", extra={"field": "evidence"}, code="bad_evidence")

    if not isinstance(evidence, dict) or set(evidence) != {"receipt", "digests", "step"}:
        raise bad("a map of receipt, digests and step")
    try:
        receipt = verify_receipt(evidence["receipt"], JobTicket.from_dict(ticket.signed))
    except (ReceiptError, TicketError) as e:
        raise bad(f"the receipt does not verify: {e}") from None
    digests, step = evidence["digests"], evidence["step"]
    if receipt.session_id != session_id:
        raise bad("the receipt is for another session")
    if not (
        isinstance(digests, list)
        and len(digests) == receipt.steps <= MAX_EVIDENCE_STEPS
        and all(isinstance(d, str) and _HEX64.match(d) for d in digests)
    ):
        raise bad(f"digests must be the receipt's {receipt.steps} output digests (hex sha256)")
    if type(step) is not int or not 0 <= step < len(digests):
        raise bad("step must index the digests")
    chain = chain_start(ticket.ticket_id, session_id)
    for d in digests:
        chain = chain_next(chain, bytes.fromhex(d))
    if chain.hex() != receipt.chain:
        raise bad("the digests do not reproduce the receipt's hash chain")
    try:
        claimed_digest = framed_tensor_digest(claimed)
    except (ValueError, msgpack.UnpackException) as e:
        raise bad(f"claimed is not an encoded tensor: {e}") from None
    if claimed_digest.hex() != digests[step]:
        raise bad(f"claimed is not the output of step {step}")


def _check_deposit(deposit: Any, *, proven: bool) -> None:
    """An audit proves what it claims (evidence) or puts credits at stake (a deposit)."""
    if type(deposit) is not int or not 0 <= deposit <= MAX_AMOUNT:
        raise ValidationFailed(
            f"deposit is an integer number of micro-credits, 0 to {MAX_AMOUNT}", extra={"field": "deposit"}
        )
    if proven:
        return
    if settings.HIVEMART_AUDIT_REQUIRE_EVIDENCE:
        raise ValidationFailed(
            "this marketplace requires evidence that the provider signed for the claimed output",
            extra={"field": "evidence"},
            code="evidence_required",
        )
    minimum = settings.HIVEMART_AUDIT_DEPOSIT
    if deposit < minimum:
        raise ValidationFailed(
            f"an audit without evidence needs a deposit of at least {minimum} micro-credits (returned if the "
            f"provider is found cheating, forfeited if the audit proves nothing); send evidence (the provider's "
            f"receipt and your output digests) or a deposit",
            extra={"field": "deposit", "minimum": minimum},
            code="evidence_or_deposit_required",
        )


def _check_audit_quota(user: User, size: int) -> None:
    """The reporter's stored audit tensors, over all its jobs, stay within HIVEMART_AUDIT_QUOTA_BYTES.
    Locks the user's row so that two audits filed at once cannot both fit in the last space."""
    User.objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).get()
    used = sum(Audit.objects.filter(reporter=user, stored_bytes__gt=0).values_list("stored_bytes", flat=True))
    quota = settings.HIVEMART_AUDIT_QUOTA_BYTES
    if used + size > quota:
        raise Conflict(
            f"your open audits already store {used} bytes of tensors and this one needs {size}; the limit "
            f"is {quota} bytes per user. Wait for their verdicts (tensors are dropped once an audit is "
            f"decided) or send smaller tensors",
            extra={"used": used, "needed": size, "quota": quota},
            code="audit_quota_exceeded",
        )


@transaction.atomic
def audit_create(
    *,
    user: User,
    job: Job,
    ticket_id: str,
    session_id: str,
    start: int,
    end: int,
    dtype: str,
    inputs: bytes,
    claimed: bytes,
    reference: bytes,
    reference_peer: str,
    evidence: dict[str, Any] | None = None,
    deposit: int = 0,
) -> Audit:
    """File an audit: the output of ticket ``ticket_id``'s provider for blocks [start, end)
    (``claimed``) differed from the backup ``reference_peer``'s (``reference``) on the same
    ``inputs``. The job's owner (or staff) files it; the scheduler's ``audit_decide``
    recomputes the span and decides. Tensors are ``encode_message({}, [tensor])`` bytes.

    An audit costs the platform a recomputation and stores up to three tensors, so it needs
    ``evidence`` (``{"receipt", "digests", "step"}``: proof that ``claimed`` is an output the
    provider signed for) or a ``deposit`` of at least ``HIVEMART_AUDIT_DEPOSIT`` micro-credits,
    held from the reporter's wallet until the verdict: returned if the provider cheated,
    forfeited to the platform otherwise. ``HIVEMART_AUDIT_REQUIRE_EVIDENCE`` refuses audits
    without evidence. The reporter's stored tensors count against ``HIVEMART_AUDIT_QUOTA_BYTES``."""
    if not user.is_staff and job.user_id != user.pk:
        raise PermissionDenied("only the job's owner may file an audit for it")
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)
    ticket = Ticket.objects.select_related("provider").filter(job=job, ticket_id=ticket_id).first()
    if ticket is None:
        raise NotFound(f"job #{job.pk} has no ticket {ticket_id}", extra={"field": "ticket_id"})
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.match(session_id):
        raise ValidationFailed("session_id is 8 to 64 characters of [A-Za-z0-9_-]", extra={"field": "session_id"})
    if not (isinstance(start, int) and isinstance(end, int) and ticket.block_start <= start < end <= ticket.block_end):
        raise ValidationFailed(
            f"blocks {start}:{end} are outside the ticket's {ticket.block_start}:{ticket.block_end}",
            extra={"field": "start"},
        )
    if dtype not in AUDIT_DTYPES:
        raise ValidationFailed(f"dtype is one of {', '.join(AUDIT_DTYPES)}", extra={"field": "dtype"})
    for name, blob in (("inputs", inputs), ("claimed", claimed), ("reference", reference)):
        _check_tensor_blob(name, blob)
    backup = (
        Provider.objects.filter(
            peer_id=reference_peer, tickets__job=job, tickets__block_start__lte=start, tickets__block_end__gte=end
        )
        .exclude(pk=ticket.provider_id)
        .first()
    )
    if backup is None:
        raise ValidationFailed(
            f"{reference_peer} holds no ticket of job #{job.pk} for blocks {start}:{end}",
            extra={"field": "reference_peer"},
            code="bad_reference",
        )
    if evidence is not None:
        _check_evidence(evidence, ticket, session_id, bytes(claimed))
    _check_deposit(deposit, proven=evidence is not None)
    if Audit.objects.filter(job=job, state=Audit.State.OPEN).count() >= MAX_OPEN_AUDITS_PER_JOB:
        raise Conflict(
            f"job #{job.pk} already has {MAX_OPEN_AUDITS_PER_JOB} audits waiting for a verdict", code="too_many_audits"
        )
    size = len(inputs) + len(claimed) + len(reference)
    _check_audit_quota(user, size)
    hold = None
    if deposit:
        # InsufficientCredits (402) when the wallet cannot cover it; nothing is stored then.
        hold = hold_place(
            account=wallet_get_or_create(user=user), amount=deposit, memo=f"deposit of an audit of job #{job.pk}"
        )
    audit = Audit.objects.create(
        job=job,
        reporter=user,
        ticket=ticket,
        provider=ticket.provider,
        reference_provider=backup,
        session_id=session_id,
        block_start=start,
        block_end=end,
        dtype=dtype,
        inputs=bytes(inputs),
        claimed=bytes(claimed),
        reference=bytes(reference),
        claimed_proven=evidence is not None,
        deposit=deposit,
        deposit_hold=hold,
        stored_bytes=size,
        deposit_state=Audit.DepositState.HELD if hold else Audit.DepositState.NONE,
    )
    for hook in _audit_hooks:
        hook(audit.pk)
    return audit


@transaction.atomic
def audit_equivocation_create(*, user: User, job: Job, ticket_id: str, records: Any) -> Audit:
    """File and decide at once an audit whose evidence is two step records
    (``hivemart_core.protocol.commitments``) that the provider of ``ticket_id`` signed for one step
    of a session on that ticket and that differ: it pushed the next provider another output than
    it returned to the client. Signatures decide it, no recomputation: the verdict is
    ``provider_cheated``, with what that entails (its work on the job voided, an offence)."""
    if not user.is_staff and job.user_id != user.pk:
        raise PermissionDenied("only the job's owner may file an audit for it")
    job = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)
    ticket = Ticket.objects.select_related("provider").filter(job=job, ticket_id=ticket_id).first()
    if ticket is None:
        raise NotFound(f"job #{job.pk} has no ticket {ticket_id}", extra={"field": "ticket_id"})
    if not isinstance(records, list) or len(records) != 2:
        raise ValidationFailed("records are the provider's two step records of one step", extra={"field": "records"})
    try:
        returned, pushed = (StepRecord.from_dict(r) for r in records)
    except StepRecordError as e:
        raise ValidationFailed(f"records: {e}", extra={"field": "records"}, code="bad_evidence") from None
    if returned.peer != ticket.provider.peer_id or returned.ticket_id != ticket.ticket_id:
        raise ValidationFailed(
            f"the records must be signed by {ticket.provider.peer_id} for ticket {ticket_id}",
            extra={"field": "records"},
            code="bad_evidence",
        )
    if not equivocation(returned, pushed):
        raise ValidationFailed(
            "the records do not prove anything: they must both verify and differ for one (session, ticket, step)",
            extra={"field": "records"},
            code="bad_evidence",
        )
    audit = Audit.objects.create(
        job=job,
        reporter=user,
        ticket=ticket,
        provider=ticket.provider,
        session_id=returned.session_id,
        block_start=ticket.block_start,
        block_end=ticket.block_end,
        dtype="",
        inputs=b"",
        claimed=b"",
        reference=b"",
        claimed_proven=True,
    )
    return audit_verdict_record(
        audit_id=audit.pk,
        verdict=Audit.Verdict.PROVIDER_CHEATED,
        detail=f"equivocation: step {returned.step_id} of session {returned.session_id} signed with output "
        f"{returned.output_digest} and with output {pushed.output_digest}",
    )


def provider_offence_record(
    *, provider: Provider, kind: str, detail: str, job: Job | None = None, audit: Audit | None = None
) -> Offence:
    """Record an offence: the provider's reputation falls by ``HIVEMART_REPUTATION_PENALTY``
    and, at ``HIVEMART_SUSPEND_AFTER`` offences, it is suspended (out of matching and placement)."""
    with transaction.atomic():
        offence = Offence.objects.create(provider=provider, kind=kind, job=job, audit=audit, detail=detail[:200])
        provider_reputation_lower(provider=provider, by=settings.HIVEMART_REPUTATION_PENALTY)
        count = Offence.objects.filter(provider=provider).count()
        if count >= settings.HIVEMART_SUSPEND_AFTER:
            provider_suspend(provider=provider, reason=f"{count} offences; the last: {detail}"[:200])
    logger.warning("provider %s offence (%s): %s", provider.pk, kind, detail)
    return offence


@transaction.atomic
def provider_job_void(*, job: Job, provider: Provider) -> int:
    """Void the provider's tickets for ``job``: their receipts are never settled, and what was
    already paid for them is clawed back from its earnings (as far as their balance allows,
    with the platform's fee on it) to the job's hold, or to the client's wallet once the hold
    is closed. Returns the micro-credits taken from the provider; voiding twice takes nothing."""
    tickets = Ticket.objects.select_for_update().filter(job=job, provider=provider, voided_at__isnull=True)
    if not Ticket.objects.filter(job=job, provider=provider).exists():
        raise NotFound(f"provider {provider.pk} holds no ticket of job #{job.pk}")
    if Ticket.objects.filter(job=job, provider=provider, voided_at__isnull=False).exists():
        tickets.update(voided_at=timezone.now())
        return 0
    tickets.update(voided_at=timezone.now())
    paid = Settlement.objects.filter(job=job, provider=provider, transaction__isnull=False).values("transaction_id")
    legs = Posting.objects.filter(transaction_id__in=paid)
    net = sum(legs.filter(account_id=provider.earnings_account_id).values_list("amount", flat=True))
    fee = sum(legs.filter(account__kind=Account.Kind.FEES).values_list("amount", flat=True))
    if net <= 0:
        return 0
    job = Job.objects.select_related("hold").get(pk=job.pk)
    _, taken = clawback(
        source=provider.earnings_account,
        hold=job.hold,
        amount=net,
        fee_refund=fee,
        idempotency_key=f"clawback:job:{job.pk}:provider:{provider.pk}",
        memo=f"job #{job.pk}: work voided by an audit",
    )
    return taken


def _audit_deposit_settle(audit: Audit, *, proved: bool) -> None:
    """Return the audit's deposit to the reporter when it proved something, else forfeit it to
    the platform; and drop its tensors (the verdict is recorded, the quota space is freed).
    Both ledger movements close the hold, so a second call moves nothing."""
    if audit.deposit_hold_id is not None:
        if proved:
            hold_release(hold=audit.deposit_hold, memo=f"deposit of audit #{audit.pk} returned")
            audit.deposit_state = Audit.DepositState.RETURNED
        else:
            hold_forfeit(hold=audit.deposit_hold, memo=f"deposit of audit #{audit.pk} forfeited: {audit.verdict}")
            audit.deposit_state = Audit.DepositState.FORFEITED
    audit.inputs = audit.claimed = audit.reference = b""
    audit.stored_bytes = 0
    audit.save(update_fields=["deposit_state", "inputs", "claimed", "reference", "stored_bytes"])


@transaction.atomic
def audit_verdict_record(*, audit_id: int, verdict: str, detail: str, validator_failed: bool = False) -> Audit:
    """Store the validator's verdict; when the provider cheated, void its work on the job,
    claw back what it was paid, and record the offence (once per provider and job). The
    deposit comes back when the provider cheated or the validator could not judge
    (``validator_failed``: no checkpoint, the platform's shortcoming), and is forfeited otherwise."""
    if verdict not in Audit.Verdict.values:
        raise ValidationFailed(f"verdict is one of {', '.join(Audit.Verdict.values)}", extra={"field": "verdict"})
    job_id = Audit.objects.filter(pk=audit_id).values_list("job_id", flat=True).first()
    if job_id is None:
        raise NotFound(f"no audit {audit_id}")
    job = Job.objects.select_for_update(of=("self",)).get(pk=job_id)  # settlement's lock: no payment races this
    audit = Audit.objects.select_for_update(of=("self",)).select_related("provider", "deposit_hold").get(pk=audit_id)
    if audit.state == Audit.State.DECIDED:
        return audit
    audit.state, audit.verdict, audit.detail, audit.decided_at = (
        Audit.State.DECIDED,
        verdict,
        detail[:500],
        timezone.now(),
    )
    audit.save(update_fields=["state", "verdict", "detail", "decided_at"])
    _audit_deposit_settle(audit, proved=verdict == Audit.Verdict.PROVIDER_CHEATED or validator_failed)
    if verdict == Audit.Verdict.PROVIDER_CHEATED:
        taken = provider_job_void(job=job, provider=audit.provider)
        if not Offence.objects.filter(provider=audit.provider, job=job, kind=Offence.Kind.AUDIT).exists():
            provider_offence_record(
                provider=audit.provider,
                kind=Offence.Kind.AUDIT,
                job=job,
                audit=audit,
                detail=f"audit #{audit.pk} of job #{job.pk}: {detail}",
            )
        logger.warning(
            "audit #%s: provider %s cheated on job #%s; %s micro-credits clawed back",
            audit.pk,
            audit.provider_id,
            job.pk,
            taken,
        )
    return audit
