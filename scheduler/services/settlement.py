"""Settlement sweeps: the scheduler's side of paying receipts (the marketplace does the paying)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime


def receipts_settle(*, job_ids: Sequence[int] | None = None, now: datetime | None = None) -> dict[str, object]:
    """Pay providers for their unsettled receipts and close finished settling jobs
    (``marketplace.receipts.services.settlement.receipts_settle``); a summary for the task result."""
    from marketplace.receipts.services.settlement import receipts_settle as settle

    return settle(job_ids=job_ids, now=now).to_dict()
