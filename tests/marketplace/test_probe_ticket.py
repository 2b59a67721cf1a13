"""Tickets the scheduler signs for its probes: unpaid, for the probed provider's blocks only."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemart_core.protocol.tickets import verify_ticket
from marketplace.common.errors import ValidationFailed
from marketplace.receipts.models import Ticket
from marketplace.receipts.services import PROBE_JOB_ID, ticket_issue_for_probe
from tests.marketplace.factories import make_provider
from tests.marketplace.settlement import platform, platform_key_file


@pytest.mark.django_db
def test_probe_tickets_are_signed_unpaid_and_stored_nowhere(settings, tmp_path: Path) -> None:  # noqa: ANN001
    settings.HIVEMART_PLATFORM_KEY_FILE = platform_key_file(tmp_path)
    provider = make_provider()
    data = ticket_issue_for_probe(provider=provider, max_units=40)
    ticket = verify_ticket(
        data, platform_key=platform().public_key, provider_peer=provider.peer_id, model_id=provider.model.model_id
    )
    assert (ticket.job_id, ticket.price, ticket.max_units) == (PROBE_JOB_ID, 0, 40)
    assert (ticket.start, ticket.end) == (provider.block_start, provider.block_end)
    assert ticket_issue_for_probe(provider=provider, max_units=40)["client_key"] != data["client_key"]
    assert not Ticket.objects.exists()
    with pytest.raises(ValidationFailed):
        ticket_issue_for_probe(provider=provider, max_units=0)
