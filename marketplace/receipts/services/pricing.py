"""What a ticket's work costs and what of it is payable: the arithmetic that tickets,
settlement and disputes share (docs/protocol.md, "Payment channel" and "Rounding").

Costs are computed on cumulative units and fees on cumulative paid amounts, so however
settlement is split the provider amount and the fee are the same.
"""

from __future__ import annotations

from django.conf import settings

from hivemart_core.figures import cost_of_units
from marketplace.jobs.models import Job
from marketplace.ledger.services import (
    fee_for,
)

# A job's tickets are paid, and new ones issued, only in these states.
PAYABLE_STATES = (Job.State.PLANNED, Job.State.RUNNING, Job.State.SETTLING)


def ticket_cost(units: int, *, max_units: int, price: int) -> int:
    """Micro-credits owed for ``units`` cumulative work units on a ticket, rounded up: any
    work the client pays for pays its provider at least one micro-credit. Computed on
    cumulative units, so however a stream of receipts is split into settlements, the total
    is the same (docs/protocol.md, "Rounding")."""
    return cost_of_units(min(units, max_units), price)


def ticket_fee(amount: int) -> int:
    """The platform's fee on a ticket's cumulative paid ``amount`` (rounded down, in the
    provider's favour). A capture's fee is the increase of this over the capture, so the
    fee does not depend on how settlement was split."""
    return fee_for(amount, settings.HIVEMART_PLATFORM_FEE_BPS)


def payable_units(*, units: int, acked_units: int, credit_units: int, max_units: int) -> int:
    """Work units a ticket is paid for: everything the client countersigned, and beyond it at
    most ``credit_units`` of work only the provider signed for (0 while it is disputed)."""
    return min(max_units, max(acked_units, min(units, acked_units + credit_units)))
