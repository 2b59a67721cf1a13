"""Placement: which span of a model a joining provider should serve."""

from __future__ import annotations

from hivemart_core.placement import choose_span
from marketplace.catalog.models import CatalogModel
from marketplace.common.errors import ValidationFailed
from scheduler.services.offers import offers_for_matching, reliability_floor


def placement_suggest(*, model: CatalogModel, num_blocks: int) -> tuple[int, int]:
    """The span ``[start, end)`` of ``model`` a joining provider with room for ``num_blocks``
    blocks should serve: the one raising the weakest block's throughput (Petals' rule,
    :func:`hivemart_core.placement.choose_span`), from the usable providers' figures."""
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        raise ValidationFailed("num_blocks is a positive integer", extra={"field": "num_blocks"})
    spans = [
        (o.start, o.end, o.throughput) for o in offers_for_matching(model=model) if o.reliability >= reliability_floor()
    ]
    return choose_span(model.num_blocks, num_blocks, spans)
