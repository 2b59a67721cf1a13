"""Step records: what they prove, and what a forger gains (nothing)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hivemart_core.protocol.commitments import StepRecord, StepRecordError, digest_hex, equivocation, sign_step
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import tensor_digest

UPSTREAM = Identity.from_seed(bytes([1] * 32))
DOWNSTREAM = Identity.from_seed(bytes([2] * 32))
OUTPUT = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
NOISY = OUTPUT + 0.01


def record(identity: Identity = UPSTREAM, output: torch.Tensor = OUTPUT, **overrides) -> StepRecord:
    fields = {
        "session_id": "upstream-session",
        "instance": "0123456789abcdef",
        "ticket_id": "tkt_job_1_up",
        "step_id": 7,
        "position": 3,
        "input_digest": "ab" * 32,
        "output_digest": digest_hex(output),
        **overrides,
    }
    return sign_step(identity, **fields)


def test_a_record_round_trips_and_verifies():
    signed = record()
    assert StepRecord.from_dict(signed.to_dict()).verify() == signed
    assert signed.peer == UPSTREAM.peer_id and signed.output_digest == tensor_digest(OUTPUT).hex()


@pytest.mark.parametrize(
    "change",
    [
        {"output_digest": digest_hex(NOISY)},
        {"step_id": 8},
        {"position": 4},
        {"session_id": "another-session"},
        {"input_digest": "cd" * 32},
        {"ticket_id": "tkt_job_2_up"},
        {"instance": "fedcba9876543210"},
    ],
)
def test_a_record_changed_after_signing_does_not_verify(change):
    with pytest.raises(StepRecordError) as error:
        replace(record(), **change).verify()
    assert error.value.code == "step_record_signature"


def test_a_record_in_another_peers_name_does_not_verify():
    # The downstream signs a record about a noisy output and names the upstream as its signer.
    forged = replace(record(DOWNSTREAM, NOISY), peer=UPSTREAM.peer_id)
    with pytest.raises(StepRecordError, match="not signed by"):
        forged.verify()


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"peer": "x"},
        {**record().to_dict(), "extra": 1},
        {**record().to_dict(), "step_id": True},
        {**record().to_dict(), "step_id": -1},
        {**record().to_dict(), "output_digest": "AB" * 32},
        {**record().to_dict(), "signature": "00"},
        {**record().to_dict(), "session_id": "a b"},
        {**record().to_dict(), "ticket_id": "short"},
        {**record().to_dict(), "instance": "xyz"},
    ],
)
def test_malformed_records_are_refused_with_a_typed_error(data):
    with pytest.raises(StepRecordError) as error:
        StepRecord.from_dict(data)
    assert error.value.code == "bad_step_record"


def test_check_about_names_what_differs():
    signed = record()
    assert signed.check_about(peer=UPSTREAM.peer_id, step_id=7, position=3, output_digest=digest_hex(OUTPUT)) is signed
    with pytest.raises(StepRecordError, match="output_digest") as error:
        signed.check_about(peer=UPSTREAM.peer_id, step_id=7, position=3, output_digest=digest_hex(NOISY))
    assert error.value.code == "step_record_mismatch"
    with pytest.raises(StepRecordError, match="peer"):
        signed.check_about(peer=DOWNSTREAM.peer_id, step_id=7, position=3)


def test_two_different_records_of_one_step_prove_equivocation():
    returned, pushed = record(), record(output=NOISY)
    assert equivocation(returned, pushed) and equivocation(returned.to_dict(), pushed.to_dict())


@pytest.mark.parametrize(
    "second",
    [
        lambda: record(),  # the same record twice
        lambda: record(output=NOISY, step_id=8),  # another step
        lambda: record(output=NOISY, session_id="another-session"),  # another session
        lambda: record(output=NOISY, ticket_id="tkt_job_2_up"),  # another ticket (another job)
        lambda: record(output=NOISY, instance="fedcba9876543210"),  # the session reopened under its old id
        lambda: record(DOWNSTREAM, NOISY),  # signed by someone else
        lambda: replace(record(DOWNSTREAM, NOISY), peer=UPSTREAM.peer_id),  # forged in the upstream's name
        lambda: {**record(output=NOISY).to_dict(), "signature": "00" * 64},  # a bad signature
        lambda: "not a record",
    ],
)
def test_nothing_else_proves_equivocation(second):
    assert not equivocation(record(), second())
