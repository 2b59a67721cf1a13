"""The client's receipt collector: mirror, check, countersign, upload in batches."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest
import torch

from hivemart_core.errors import APIConnectionError
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import ReceiptCounter, tensor_digest, verify_receipt, work_units
from hivemart_core.protocol.tickets import JobTicket, issue_ticket
from hivemart_core.swarm.receipts import ReceiptCollector

PLATFORM = Identity.from_seed(bytes(range(32)))
PROVIDER = Identity.from_seed(bytes([7] * 32))
CLIENT = Identity.from_seed(bytes([9] * 32))
SESSION = "session-0001"


def make_ticket(ticket_id: str = "tkt_0001abcd", **overrides: object) -> JobTicket:
    body = dict(
        ticket_id=ticket_id,
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


class Provider:
    """The provider's side of one (ticket, session), fed the same outputs as the client."""

    def __init__(self, ticket: JobTicket, session_id: str = SESSION) -> None:
        self.counter = ReceiptCounter(ticket, session_id)

    def step(self, output: torch.Tensor, blocks: int = 4) -> int:
        units = work_units(tokens=output.shape[0] * output.shape[1], blocks=blocks)
        self.counter.record(units, tensor_digest(output))
        return units

    def receipt(self) -> dict[str, Any]:
        return self.counter.receipt(PROVIDER).to_dict()


class Market:
    """Records uploads; answers like POST /api/receipts/."""

    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list[dict]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, receipts: list[dict]) -> list[dict]:
        with self.lock:
            if self.fail:
                self.fail -= 1
                raise APIConnectionError("marketplace down")
            self.batches.append(receipts)
        return [{"status": "accepted"} for _ in receipts]


def run(
    collector: ReceiptCollector,
    provider: Provider,
    ticket: JobTicket,
    outputs: list[torch.Tensor],
    session_id: str = SESSION,
) -> None:
    for output in outputs:
        units = provider.step(output)
        collector.record(ticket, session_id, units, output)


def test_a_receipt_that_matches_the_mirror_is_countersigned_and_uploaded() -> None:
    ticket, market = make_ticket(), Market()
    collector, provider = ReceiptCollector(CLIENT, upload=market), Provider(ticket)
    run(collector, provider, ticket, [torch.randn(1, 5, 8), torch.randn(1, 1, 8)])
    signed = collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION)
    assert signed is not None and signed.units == 24 and signed.client_signature
    assert verify_receipt(signed.to_dict(), ticket, require_client_signature=True) == signed
    collector.flush()
    assert market.batches == [[signed.to_dict()]]
    assert collector.summary()["upload"] == {"accepted": 1}
    # 24 units at 2 credits per million units: 48 micro-credits, what `generate --paid` prints.
    assert collector.summary()["cost"] == 24 * 2_000_000 // 1_000_000
    assert collector.problems == []


def test_only_the_newest_receipt_per_session_is_uploaded() -> None:
    ticket, market = make_ticket(), Market()
    collector, provider = ReceiptCollector(CLIENT, upload=market), Provider(ticket)
    for _ in range(3):
        run(collector, provider, ticket, [torch.randn(1, 1, 8)])
        assert collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION) is not None
    collector.flush()
    assert [[r["seq"] for r in batch] for batch in market.batches] == [[3]]


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        ("more_units", "receipt_units"),
        ("other_output", "receipt_chain"),
        ("wrong_session", "receipt_ticket"),
        ("replay", "receipt_replay"),
        ("forged_signature", "receipt_signature"),
        ("other_job", "receipt_ticket"),
        ("garbage", "bad_receipt"),
    ],
)
def test_a_receipt_that_disagrees_is_not_countersigned(tamper: str, code: str) -> None:
    ticket, market = make_ticket(), Market()
    collector, provider = ReceiptCollector(CLIENT, upload=market), Provider(ticket)
    output = torch.randn(1, 2, 8)
    run(collector, provider, ticket, [output])
    first = provider.receipt()
    data: Any = first
    if tamper == "more_units":
        provider.counter.units += 1  # bills a token the client never got
        data = provider.receipt()
    elif tamper == "other_output":
        provider.step(output + 0.01)  # chains an output other than the one the client received
        collector.record(ticket, SESSION, work_units(tokens=2, blocks=4), output)
        data = provider.receipt()
    elif tamper == "wrong_session":
        other = Provider(ticket, "session-0002")
        other.step(output)
        data = other.receipt()
    elif tamper == "replay":
        assert collector.receive(first, ticket=ticket, session_id=SESSION) is not None
    elif tamper == "forged_signature":
        data = {**first, "provider_signature": Identity.generate().sign(b"x").hex()}
    elif tamper == "other_job":
        data = {**first, "job_id": 43}
    elif tamper == "garbage":
        data = ["not", "a", "receipt"]
    assert collector.receive(data, ticket=ticket, session_id=SESSION) is None
    assert [p.code for p in collector.problems] == [code]
    assert collector.summary()["refused"] == {code: 1}
    collector.flush()
    assert sum(len(b) for b in market.batches) == (1 if tamper == "replay" else 0)


def test_receipts_before_any_output_do_not_verify() -> None:
    ticket = make_ticket()
    collector, provider = ReceiptCollector(CLIENT), Provider(ticket)
    provider.step(torch.randn(1, 1, 8))  # the client never received it
    assert collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION) is None
    assert collector.problems[0].code == "receipt_units"


def test_full_batches_upload_in_the_background_and_failures_are_retried() -> None:
    market = Market(fail=1)
    collector = ReceiptCollector(CLIENT, upload=market, batch_size=2)
    tickets = [make_ticket(f"tkt_{i:04d}abcd") for i in range(4)]
    for ticket in tickets:
        provider = Provider(ticket)
        run(collector, provider, ticket, [torch.randn(1, 1, 8)])
        assert collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION) is not None
    collector.close()
    uploaded = sorted(r["ticket_id"] for batch in market.batches for r in batch)
    assert uploaded == sorted(t.ticket_id for t in tickets)  # the failed batch came back with the next flush
    assert collector.summary()["upload"] == {"accepted": 4}


def test_uploads_are_split_by_the_marketplace_limit() -> None:
    # A marketplace that serves receipts_per_upload=2: no upload carries more, even the one
    # that resends a failed batch together with newer receipts.
    market = Market(fail=1)
    collector = ReceiptCollector(CLIENT, upload=market, batch_size=2, upload_limit=2)
    tickets = [make_ticket(f"tkt_{i:04d}abcd") for i in range(5)]
    for ticket in tickets:
        provider = Provider(ticket)
        run(collector, provider, ticket, [torch.randn(1, 1, 8)])
        assert collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION) is not None
    collector.close()
    assert max(len(batch) for batch in market.batches) == 2
    assert sorted(r["ticket_id"] for batch in market.batches for r in batch) == sorted(t.ticket_id for t in tickets)


@pytest.mark.parametrize(("batch_size", "upload_limit"), [(3, 2), (1, 0), (1, True)])
def test_a_batch_beyond_the_upload_limit_is_refused(batch_size: int, upload_limit: int) -> None:
    with pytest.raises(ValueError):
        ReceiptCollector(CLIENT, upload=Market(), batch_size=batch_size, upload_limit=upload_limit)


def test_marketplace_rejections_are_kept_for_the_summary() -> None:
    ticket = make_ticket()

    def reject(receipts: list[dict]) -> list[dict]:
        return [{"status": "rejected", "code": "receipt_units", "message": "beyond the hold"} for _ in receipts]

    collector, provider = ReceiptCollector(CLIENT, upload=reject), Provider(ticket)
    run(collector, provider, ticket, [torch.randn(1, 1, 8)])
    collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION)
    collector.flush()
    assert [(p.code, p.where) for p in collector.problems] == [("receipt_units", "upload")]
    assert collector.summary()["upload_rejected"] == {"receipt_units": 1}


def test_a_receipt_with_a_client_signature_by_another_key_is_refused() -> None:
    ticket = make_ticket()
    collector, provider = ReceiptCollector(CLIENT), Provider(ticket)
    run(collector, provider, ticket, [torch.randn(1, 1, 8)])
    receipt = provider.counter.receipt(PROVIDER)
    forged = replace(receipt, client_signature=Identity.generate().sign(receipt.client_signing_bytes()).hex())
    assert collector.receive(forged.to_dict(), ticket=ticket, session_id=SESSION) is None
    assert collector.problems[0].code == "client_signature"


def test_evidence_proves_an_output_was_signed_for() -> None:
    from hivemart_core.protocol.receipts import chain_next, chain_start

    ticket = make_ticket()
    collector, provider = ReceiptCollector(CLIENT), Provider(ticket)
    outputs = [torch.randn(1, 3, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)]
    run(collector, provider, ticket, outputs[:2])
    assert collector.evidence(ticket, SESSION, outputs[1]) is None  # no receipt yet
    collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION)
    run(collector, provider, ticket, outputs[2:])
    evidence = collector.evidence(ticket, SESSION, outputs[1])
    assert evidence is not None and evidence["step"] == 1 and len(evidence["digests"]) == 2
    chain = chain_start(ticket.ticket_id, SESSION)
    for digest in evidence["digests"]:
        chain = chain_next(chain, bytes.fromhex(digest))
    assert chain.hex() == evidence["receipt"]["chain"]
    assert collector.evidence(ticket, SESSION, outputs[2]) is None  # not covered by a receipt yet
    assert collector.evidence(ticket, SESSION, outputs[0] + 1) is None  # never received


def test_a_receipt_claiming_more_units_is_refused_and_reported_as_a_dispute() -> None:
    ticket = make_ticket()
    disputes: list[tuple[dict, str, str]] = []
    collector = ReceiptCollector(
        CLIENT, dispute=lambda receipt, code, message: disputes.append((receipt, code, message))
    )
    provider = Provider(ticket)
    outputs = [torch.randn(1, 2, 8) for _ in range(2)]
    run(collector, provider, ticket, outputs)
    honest = collector.receive(provider.receipt(), ticket=ticket, session_id=SESSION)
    assert honest is not None and collector.ack(ticket, SESSION) == honest.to_dict()
    provider.counter.units *= 10  # the provider inflates its count
    inflated = provider.receipt()
    assert collector.receive(inflated, ticket=ticket, session_id=SESSION) is None
    collector.flush()
    assert [(r, code) for r, code, _ in disputes] == [(inflated, "receipt_units")]
    assert collector.summary()["disputed"] == 1
    assert collector.ack(ticket, SESSION) == honest.to_dict()  # the ack stays at what the client agreed to
    # a replay is a harmless duplicate: refused, not disputed
    assert collector.receive(honest.to_dict() | {"client_signature": ""}, ticket=ticket, session_id=SESSION) is None
    collector.close()
    assert len(disputes) == 1
