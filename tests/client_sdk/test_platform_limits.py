"""The limits a marketplace serves in its platform info, as the SDK reads them."""

from __future__ import annotations

from typing import Any

import pytest

from hivemart_core.api.types import PlatformInfo
from hivemart_core.errors import HivemartError
from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD

BASE = {"public_key": "ab" * 32, "peer_id": "12D3KooW", "fee_bps": 500, "audit_deposit": 0}


def test_the_served_receipts_limit_is_used() -> None:
    info = PlatformInfo.from_json({**BASE, "limits": {"receipts_per_upload": 37}})
    assert info.receipts_per_upload == 37


@pytest.mark.parametrize("body", [BASE, {**BASE, "limits": {}}])
def test_a_marketplace_serving_no_limit_gets_the_shared_default(body: dict[str, Any]) -> None:
    assert PlatformInfo.from_json(body).receipts_per_upload == MAX_RECEIPTS_PER_UPLOAD


@pytest.mark.parametrize(
    "limits", [{"receipts_per_upload": 0}, {"receipts_per_upload": "500"}, [1], {"receipts_per_upload": True}]
)
def test_a_malformed_limit_is_an_error_not_a_guess(limits: Any) -> None:
    with pytest.raises(HivemartError, match="receipts_per_upload|limit"):
        PlatformInfo.from_json({**BASE, "limits": limits})
