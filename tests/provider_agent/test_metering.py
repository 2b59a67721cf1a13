"""TicketBook: ticket checks, unit counting across sessions, receipts, the upload queue."""

from __future__ import annotations

import pytest
import torch

from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import ReceiptCounter, tensor_digest, verify_receipt
from hivemart_core.protocol.tickets import JobTicket, TicketError, issue_ticket
from provider_agent.metering import TicketBook

NOW = 1_800_000_000
MODEL = "llama-4x64-000000000001"
PLATFORM = Identity.from_seed(b"p" * 32)
PROVIDER = Identity.from_seed(b"v" * 32)
CLIENT = Identity.from_seed(b"c" * 32)


def ticket(**overrides) -> JobTicket:
    body = dict(
        ticket_id="ticket-0001",
        job_id=7,
        client_key=CLIENT.public_key.hex(),
        provider_peer=PROVIDER.peer_id,
        model_id=MODEL,
        model_digest="ab" * 32,
        start=0,
        end=2,
        max_units=100,
        price=1000,
        expires_at=NOW + 3600,
    )
    body.update(overrides)
    body.setdefault("credit_units", body["max_units"])  # no credit limit unless a test sets one
    return issue_ticket(PLATFORM, **body)


def book(**overrides) -> TicketBook:
    fields = dict(
        identity=PROVIDER, model_id=MODEL, platform_key=PLATFORM.public_key, receipt_every=2, clock=lambda: NOW
    )
    fields.update(overrides)
    return TicketBook(**fields)


def output(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(seed))


def test_a_valid_ticket_is_verified_once_and_then_recognised():
    tickets, data = book(), ticket().to_dict()
    assert tickets.check(data, 0, 2) == ticket()
    tickets.platform_key = b"\0" * 32  # a re-verification would now fail: the cache answers
    assert tickets.check(dict(data), 1, 2).ticket_id == "ticket-0001"


@pytest.mark.parametrize(
    "data, blocks, code",
    [
        (None, (0, 2), "ticket_required"),
        ({"ticket_id": "x"}, (0, 2), "bad_ticket"),
        (issue_ticket(Identity.from_seed(b"x" * 32), **ticket().body()).to_dict(), (0, 2), "ticket_signature"),
        ({**ticket().to_dict(), "max_units": 10**9}, (0, 2), "ticket_signature"),
        (ticket(expires_at=NOW - 3600).to_dict(), (0, 2), "ticket_expired"),
        (ticket(provider_peer=Identity.from_seed(b"o" * 32).peer_id).to_dict(), (0, 2), "ticket_wrong_provider"),
        (ticket(model_id="llama-4x64-0000000000ff").to_dict(), (0, 2), "ticket_wrong_provider"),
        (ticket().to_dict(), (1, 3), "ticket_blocks"),
    ],
    ids=["missing", "malformed", "foreign-key", "tampered", "expired", "other-provider", "other-model", "blocks"],
)
def test_bad_tickets_are_refused_with_their_code(data, blocks, code):
    with pytest.raises(TicketError) as e:
        book().check(data, *blocks)
    assert e.value.code == code


def test_a_tampered_copy_of_a_cached_ticket_is_refused():
    tickets = book()
    tickets.check(ticket().to_dict(), 0, 2)
    with pytest.raises(TicketError) as e:
        tickets.check({**ticket().to_dict(), "max_units": 10**9}, 0, 2)
    assert e.value.code == "ticket_signature"
    assert tickets.check(ticket().to_dict(), 0, 2).max_units == 100


def test_a_cached_ticket_expires():
    clock = [NOW]
    tickets = book(clock=lambda: clock[0])
    tickets.check(ticket(expires_at=NOW + 10).to_dict(), 0, 2)
    clock[0] = NOW + 10 + 31  # past the expiry and the allowed clock skew
    with pytest.raises(TicketError) as e:
        tickets.check(ticket(expires_at=NOW + 10).to_dict(), 0, 2)
    assert e.value.code == "ticket_expired"


def test_without_a_platform_key_nothing_billable_is_served():
    with pytest.raises(TicketError) as e:
        book(platform_key=None).check(ticket().to_dict(), 0, 2)
    assert e.value.code == "not_accepting"


def test_units_are_counted_per_ticket_across_sessions_and_refused_before_they_overflow():
    tickets = book()
    t = tickets.check(ticket().to_dict(), 0, 2)
    tickets.charge(t, "session-a", tokens=20, blocks=2).commit([output(1)])  # 40
    tickets.charge(t, "session-b", tokens=10, blocks=2, backward=True).commit([output(2)])  # 40, double
    assert tickets.units_used(t.ticket_id) == 80
    with pytest.raises(TicketError) as e:
        tickets.charge(t, "session-a", tokens=11, blocks=1, backward=True)  # 22 > 20 left
    assert e.value.code == "ticket_exhausted"
    assert tickets.units_used(t.ticket_id) == 80  # a refused request reserves nothing
    tickets.charge(t, "session-c", tokens=10, blocks=2).commit([output(3)])  # exactly the rest
    with pytest.raises(TicketError) as e:
        tickets.check(ticket().to_dict(), 0, 2)
    assert e.value.code == "ticket_exhausted"


def test_a_cancelled_charge_gives_its_units_back():
    tickets = book()
    t = tickets.check(ticket().to_dict(), 0, 2)
    charge = tickets.charge(t, "session-a", tokens=50, blocks=2)
    with pytest.raises(TicketError):
        tickets.charge(t, "session-b", tokens=1, blocks=1)  # all 100 reserved by the request in flight
    charge.cancel()
    charge.cancel()  # idempotent
    assert tickets.units_used(t.ticket_id) == 0
    tickets.charge(t, "session-b", tokens=1, blocks=1)


def test_receipts_are_cumulative_signed_and_match_a_mirror_of_the_outputs():
    tickets, client_side = book(), ReceiptCounter(ticket(), "session-a")
    t = tickets.check(ticket().to_dict(), 0, 2)
    seen = []
    for step in range(3):
        out = output(step)
        tickets.charge(t, "session-a", tokens=3, blocks=2).commit([out])
        client_side.record(6, tensor_digest(out))
        seen.append(verify_receipt(tickets.receipt(t, "session-a").to_dict(), ticket()))
    assert [(r.seq, r.units, r.steps) for r in seen] == [(1, 6, 1), (2, 12, 2), (3, 18, 3)]
    assert seen[-1].chain == client_side.chain and seen[-1].provider_peer == PROVIDER.peer_id


def test_receipts_are_due_every_n_steps_and_a_final_one_only_for_new_steps():
    tickets = book()
    t = tickets.check(ticket().to_dict(), 0, 2)
    due = []
    for step in range(3):
        tickets.charge(t, "s-inference", tokens=1, blocks=2).commit([output(step)])
        due.append(tickets.receipt_due(t, "s-inference"))
        if due[-1]:
            tickets.receipt(t, "s-inference")
    assert due == [False, True, False]
    final = tickets.final_receipt(t, "s-inference")
    assert final is not None and (final.seq, final.steps, final.units) == (2, 3, 6)
    assert tickets.final_receipt(t, "s-inference") is None  # nothing new since


def test_only_the_latest_receipt_per_session_waits_for_upload_and_a_failed_upload_requeues_it():
    tickets = book()
    t = tickets.check(ticket().to_dict(), 0, 2)
    for session in ("session-a", "session-a", "session-b"):
        tickets.charge(t, session, tokens=1, blocks=1).commit([output(0)])
        tickets.receipt(t, session)
    batch = tickets.take_pending()
    assert sorted((r.session_id, r.seq) for r in batch) == [("session-a", 2), ("session-b", 1)]
    assert tickets.take_pending() == []
    tickets.charge(t, "session-b", tokens=1, blocks=1).commit([output(1)])
    tickets.receipt(t, "session-b")  # supersedes the one in flight
    tickets.requeue(batch)  # the upload failed
    assert sorted((r.session_id, r.seq) for r in tickets.take_pending()) == [("session-a", 2), ("session-b", 2)]


def test_expired_tickets_are_forgotten_once_their_receipts_are_uploaded():
    clock = [NOW]
    tickets = book(clock=lambda: clock[0])
    t = tickets.check(ticket(expires_at=NOW + 10).to_dict(), 0, 2)
    tickets.charge(t, "session-a", tokens=1, blocks=1).commit([output(0)])
    tickets.receipt(t, "session-a")
    clock[0] = NOW + 100
    assert tickets.prune() == 0  # its receipt has not been uploaded yet
    tickets.take_pending()
    assert tickets.prune() == 1 and tickets.units_used(t.ticket_id) == 0


# --- the payment channel: acknowledgements and the credit window ---------------------------------


def serve(tickets: TicketBook, t: JobTicket, session: str, tokens: int, seed: int = 0):
    """One finished request of ``tokens`` tokens through the ticket's 2 blocks, and its receipt."""
    tickets.charge(t, session, tokens=tokens, blocks=2).commit([output(seed)])
    return tickets.receipt(t, session)


def test_work_beyond_the_credit_window_waits_for_the_clients_acknowledgement():
    from hivemart_core.protocol.receipts import countersign

    tickets = book()
    t = tickets.check(ticket(max_units=1_000, credit_units=10).to_dict(), 0, 2)
    first = serve(tickets, t, "session-0001", 3)  # 6 units, unacknowledged
    assert tickets.unacknowledged(t.ticket_id) == 6
    with pytest.raises(TicketError) as error:
        tickets.charge(t, "session-0001", tokens=3, blocks=2)  # 12 > 10 in the window
    assert error.value.code == "ack_overdue"
    with pytest.raises(TicketError):  # another session of the same ticket shares the window
        tickets.charge(t, "session-0002", tokens=3, blocks=2)
    tickets.charge(t, "session-0001", tokens=2, blocks=2).cancel()  # 6 + 4 fits
    tickets.acknowledge(t, countersign(first, CLIENT).to_dict())
    assert tickets.unacknowledged(t.ticket_id) == 0
    serve(tickets, t, "session-0001", 3, seed=1)  # served again
    # nothing outstanding: a request larger than the whole window is still served (once)
    tickets.acknowledge(t, countersign(tickets.latest(t.ticket_id, "session-0001"), CLIENT).to_dict())
    serve(tickets, t, "session-0001", 50, seed=2)
    with pytest.raises(TicketError):
        tickets.charge(t, "session-0001", tokens=1, blocks=2)


def test_an_acknowledgement_must_be_the_clients_countersignature_of_this_providers_receipt():
    from hivemart_core.protocol.receipts import countersign

    tickets = book()
    t = tickets.check(ticket(max_units=1_000, credit_units=10).to_dict(), 0, 2)
    receipt = serve(tickets, t, "session-0001", 3)
    forged = countersign(receipt, Identity.generate())  # not the ticket's client key
    unsigned = receipt
    inflated = countersign(replace_units(receipt, 1), CLIENT)  # the provider's signature no longer covers it
    for bad in (forged, unsigned, inflated):
        with pytest.raises(TicketError) as error:
            tickets.acknowledge(t, bad.to_dict())
        assert error.value.code == "bad_ack"
    assert tickets.unacknowledged(t.ticket_id) == 6


def test_an_acknowledged_receipt_is_uploaded_in_its_countersigned_form():
    from hivemart_core.protocol.receipts import countersign

    tickets = book()
    t = tickets.check(ticket(max_units=1_000, credit_units=10).to_dict(), 0, 2)
    receipt = serve(tickets, t, "session-0001", 3)
    assert [r.client_signature for r in tickets.take_pending()] == [""]
    tickets.acknowledge(t, countersign(receipt, CLIENT).to_dict())
    (pending,) = tickets.take_pending()
    assert pending.seq == receipt.seq and verify_receipt(pending.to_dict(), t, require_client_signature=True)


def test_a_receipt_is_due_once_half_the_window_is_unacknowledged():
    tickets = book(receipt_every=1_000)
    t = tickets.check(ticket(max_units=1_000, credit_units=20).to_dict(), 0, 2)
    tickets.charge(t, "session-0001", tokens=2, blocks=2).commit([output(0)])  # 4 of 20
    assert not tickets.receipt_due(t, "session-0001")
    tickets.charge(t, "session-0001", tokens=3, blocks=2).commit([output(1)])  # 10 of 20
    assert tickets.receipt_due(t, "session-0001")
    tickets.receipt(t, "session-0001")
    assert not tickets.receipt_due(t, "session-0001")  # already sent; waiting for the ack


def replace_units(receipt, extra: int):
    from dataclasses import replace

    return replace(receipt, units=receipt.units + extra)


def test_an_exhausted_ticket_says_to_raise_the_budget_on_the_provider_and_in_the_sdk():
    from hivemart_core.errors import RemoteError

    tickets = book()
    t = tickets.check(ticket(max_units=10).to_dict(), 0, 2)
    with pytest.raises(TicketError) as error:
        tickets.charge(t, "session-0001", tokens=6, blocks=2)
    assert error.value.code == "ticket_exhausted" and "--budget" in str(error.value)
    remote = RemoteError(error.value.code, str(error.value), peer_id=PROVIDER.peer_id)
    assert "`--budget`" in str(remote) and "max_price" in str(remote)
