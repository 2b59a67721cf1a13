"""Job tickets and work receipts: signing, verification, and every way to forge them."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import (
    ReceiptCounter,
    ReceiptError,
    WorkReceipt,
    chain_next,
    chain_start,
    countersign,
    tensor_digest,
    verify_receipt,
    work_units,
)
from hivemart_core.protocol.tickets import JobTicket, TicketError, issue_ticket, verify_ticket

PLATFORM = Identity.from_seed(bytes(range(32)))
PROVIDER = Identity.from_seed(bytes([7] * 32))
CLIENT = Identity.from_seed(bytes([9] * 32))


def make_ticket(**overrides: object) -> JobTicket:
    body = dict(
        ticket_id="tkt_0001abcd",
        job_id=42,
        client_key=CLIENT.public_key.hex(),
        provider_peer=PROVIDER.peer_id,
        model_id="llama-8x512-0123456789ab",
        model_digest="a" * 64,
        start=0,
        end=4,
        max_units=10_000,
        price=2_000_000,
        expires_at=int(time.time()) + 600,
    )
    body.update(overrides)
    body.setdefault("credit_units", body["max_units"])  # no credit limit unless a test sets one
    return issue_ticket(PLATFORM, **body)


def test_ticket_round_trip_verifies() -> None:
    ticket = make_ticket()
    again = verify_ticket(
        ticket.to_dict(), platform_key=PLATFORM.public_key, provider_peer=PROVIDER.peer_id, model_id=ticket.model_id
    )
    assert again == ticket
    assert again.covers(1, 3) and not again.covers(3, 5)


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda d: d.update(max_units=d["max_units"] + 1), "ticket_signature"),
        (lambda d: d.update(signature="00" * 64), "ticket_signature"),
        (lambda d: d.update(end=2), "ticket_signature"),
        (lambda d: d.update(job_id="42"), "bad_ticket"),
        (lambda d: d.update(extra=1), "bad_ticket"),
        (lambda d: d.pop("signature"), "bad_ticket"),
        (lambda d: d.update(end=d["start"]), "bad_ticket"),
        (lambda d: d.update(client_key="zz"), "bad_ticket"),
    ],
)
def test_tampered_tickets_are_refused(mutate, code) -> None:
    data = make_ticket().to_dict()
    mutate(data)
    with pytest.raises(TicketError) as error:
        verify_ticket(data, platform_key=PLATFORM.public_key)
    assert error.value.code == code


def test_ticket_signed_by_another_key_is_refused() -> None:
    forged = issue_ticket(Identity.generate(), **make_ticket().body())
    with pytest.raises(TicketError) as error:
        verify_ticket(forged.to_dict(), platform_key=PLATFORM.public_key)
    assert error.value.code == "ticket_signature"


def test_ticket_for_another_provider_or_expired_is_refused() -> None:
    ticket = make_ticket()
    with pytest.raises(TicketError) as error:
        verify_ticket(ticket.to_dict(), platform_key=PLATFORM.public_key, provider_peer=CLIENT.peer_id)
    assert error.value.code == "ticket_wrong_provider"
    expired = make_ticket(expires_at=int(time.time()) - 3600)
    with pytest.raises(TicketError) as error:
        verify_ticket(expired.to_dict(), platform_key=PLATFORM.public_key)
    assert error.value.code == "ticket_expired"
    with pytest.raises(TicketError) as error:
        ticket.check_covers(2, 6)
    assert error.value.code == "ticket_blocks"


def test_not_a_map_is_a_bad_ticket() -> None:
    for garbage in (None, [], "ticket", 5):
        with pytest.raises(TicketError):
            verify_ticket(garbage, platform_key=PLATFORM.public_key)


def test_work_units_count_backward_double() -> None:
    assert work_units(tokens=3 * 5, blocks=4) == 60
    assert work_units(tokens=15, blocks=4, backward=True) == 120


def test_counter_receipts_are_cumulative_and_chain_outputs() -> None:
    ticket = make_ticket()
    counter = ReceiptCounter(ticket, "session-0001")
    outputs = [torch.randn(1, 3, 8), torch.randn(1, 1, 8)]
    for output in outputs:
        counter.record(work_units(tokens=output.shape[0] * output.shape[1], blocks=4), tensor_digest(output))
    receipt = counter.receipt(PROVIDER)
    assert (receipt.units, receipt.steps, receipt.seq) == (16, 2, 1)
    expected = chain_start(ticket.ticket_id, "session-0001")
    for output in outputs:
        expected = chain_next(expected, tensor_digest(output))
    assert receipt.chain == expected.hex()
    assert counter.receipt(PROVIDER).seq == 2

    signed = countersign(receipt, CLIENT)
    assert verify_receipt(signed.to_dict(), ticket, require_client_signature=True) == signed


def test_tensor_digest_depends_on_values_dtype_and_shape() -> None:
    x = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.reshape(2, 3))
    assert tensor_digest(x) != tensor_digest(x.to(torch.float16))
    y = x.clone()
    y[3] += 1e-6
    assert tensor_digest(x) != tensor_digest(y)
    assert len(tensor_digest(x.to(torch.bfloat16))) == 32


def _receipt(ticket: JobTicket, units: int = 100) -> WorkReceipt:
    counter = ReceiptCounter(ticket, "session-0001")
    counter.record(units, b"\x00" * 32)
    return counter.receipt(PROVIDER)


@pytest.mark.parametrize(
    ("forge", "code"),
    [
        (lambda r, t: replace(r, units=r.units + 1), "receipt_signature"),
        (lambda r, t: replace(r, chain="0" * 64), "receipt_signature"),
        (lambda r, t: replace(r, job_id=43), "receipt_ticket"),
        (lambda r, t: replace(r, ticket_id="tkt_other001"), "receipt_ticket"),
        (
            lambda r, t: replace(r, provider_signature=Identity.generate().sign(r.signing_bytes()).hex()),
            "receipt_signature",
        ),
        (lambda r, t: replace(countersign(r, CLIENT), units=r.units), "ok"),
        (
            lambda r, t: replace(r, client_signature=Identity.generate().sign(r.client_signing_bytes()).hex()),
            "client_signature",
        ),
        (lambda r, t: replace(countersign(r, CLIENT), seq=r.seq + 1), "receipt_signature"),
    ],
)
def test_forged_receipts_are_refused(forge, code) -> None:
    ticket = make_ticket()
    forged = forge(_receipt(ticket), ticket)
    if code == "ok":
        verify_receipt(forged.to_dict(), ticket)
        return
    with pytest.raises(ReceiptError) as error:
        verify_receipt(forged.to_dict(), ticket)
    assert error.value.code == code


def test_receipt_beyond_the_ticket_or_without_countersignature() -> None:
    ticket = make_ticket(max_units=50)
    with pytest.raises(ReceiptError) as error:
        verify_receipt(_receipt(ticket, units=51).to_dict(), ticket)
    assert error.value.code == "receipt_units"
    with pytest.raises(ReceiptError) as error:
        verify_receipt(_receipt(ticket, units=10).to_dict(), ticket, require_client_signature=True)
    assert error.value.code == "client_signature"


def test_malformed_receipts_are_bad_receipts() -> None:
    data = _receipt(make_ticket()).to_dict()
    for key, value in (("units", -1), ("seq", 0), ("chain", "xyz"), ("session_id", "a b"), ("units", 1.5)):
        with pytest.raises(ReceiptError) as error:
            verify_receipt({**data, key: value}, make_ticket())
        assert error.value.code == "bad_receipt"


def test_output_comparison_tolerances() -> None:
    from hivemart_core.protocol.verification import compare_outputs

    torch.manual_seed(0)
    reference = torch.randn(4, 32, 128)  # activations of a small batch: 16k values
    assert compare_outputs(reference.clone(), reference)
    assert compare_outputs(reference * (1 + 1e-5), reference)
    noisy = reference + 0.01 * reference.abs().max() * torch.randn_like(reference)
    for dtype in ("float32", "float16", "bfloat16"):
        assert not compare_outputs(noisy, reference, dtype=dtype), dtype
    assert compare_outputs(reference.to(torch.bfloat16), reference)  # bf16 rounding alone is within tolerance
    assert not compare_outputs(reference[:, :4], reference)
    nan = reference.clone()
    nan[0, 0, 0] = float("nan")
    assert not compare_outputs(nan, reference)
