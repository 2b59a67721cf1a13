"""Receipt uploads: checking providers' signed receipts against their tickets and storing them.

A receipt is checked against its stored ticket (``verify_receipt``): provider signature, the
ticket's job and provider, units within ``max_units``, and the client's countersignature when
present. The newest receipt (highest ``seq``) per (ticket, session) is kept; a receipt not
newer than the stored one is ``stale`` (a replay; harmless) unless it is countersigned, when
its units still count as acknowledged (``acked_units``); a newer one with fewer units is
refused (cumulative counts never go down). Who may upload: the job's owner (the client), the
user who registered the provider the receipt names, staff. At most
``MAX_RECEIPTS_PER_UPLOAD`` receipts per upload (``hivemart_core.protocol.receipts``, served in
the platform info). Nothing here moves credits: ``settlement`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from hivemart_core.protocol.receipts import (
    MAX_RECEIPTS_PER_UPLOAD,
    ReceiptError,
    WorkReceipt,
    verify_receipt,
)
from hivemart_core.protocol.tickets import JobTicket, TicketError
from marketplace.accounts.models import User
from marketplace.common.errors import ValidationFailed
from marketplace.jobs.models import TERMINAL_STATES
from marketplace.receipts.models import Receipt, Ticket

# Called (inside the upload's transaction) with the ids of the jobs whose receipts were
# accepted; the scheduling app registers one that queues their settlement on commit.
_uploaded_hooks: list[Callable[[list[int]], None]] = []


def receipts_uploaded_hook_register(hook: Callable[[list[int]], None]) -> None:
    """Call ``hook(job_ids)`` after every upload that accepted at least one receipt."""
    if hook not in _uploaded_hooks:
        _uploaded_hooks.append(hook)


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
