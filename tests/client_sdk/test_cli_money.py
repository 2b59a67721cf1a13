"""``hivemart wallet topup|topups`` and ``hivemart payouts ...`` against a live marketplace over
a real socket: the test payment provider end to end, and a payout requested by its provider's
owner and decided by staff."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from hivemart.cli import cli
from hivemart.cli.money import credits_to_micro
from marketplace.accounts.services import api_key_create, user_create
from marketplace.ledger.selectors import wallet_balance
from marketplace.payments.models import PayoutRequest
from tests.marketplace.test_payments import earning_provider


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("HIVEMART_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.delenv("HIVEMART_API_KEY", raising=False)
    monkeypatch.delenv("HIVEMART_URL", raising=False)
    return CliRunner()


def run(runner: CliRunner, *args: str, ok: bool = True) -> str:
    result = runner.invoke(cli, list(args), catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def test_credits_parse_exactly() -> None:
    assert credits_to_micro("1.5") == 1_500_000 and credits_to_micro("0.000001") == 1
    for bad in ("0", "-1", "0.0000001", "abc", "nan", "inf"):
        with pytest.raises(click.BadParameter):
            credits_to_micro(bad)


def test_a_test_top_up_from_the_command_line(runner: CliRunner, live_server: Any, settings: Any) -> None:
    settings.HIVEMART_STRIPE_SECRET_KEY, settings.HIVEMART_TEST_TOPUPS = "", True
    user = user_create(username="topper")
    opts = ("--url", live_server.url, "--api-key", api_key_create(user=user).raw)
    out = run(runner, "wallet", "topup", "250", *opts)
    assert "Pay at: " + live_server.url + "/wallet/topups/" in out and "(test)" in out
    assert wallet_balance(user=user) == 0
    out = run(runner, "wallet", "topup", "300", "--test-pay", *opts)
    assert "300.000000 credits paid" in out and wallet_balance(user=user) == 300_000_000
    listed = json.loads(run(runner, "wallet", "topups", "--json", *opts))
    assert [(t["credits"], t["state"]) for t in listed] == [(300_000_000, "paid"), (250_000_000, "pending")]
    out = run(runner, "wallet", "topup", "5", *opts, ok=False)  # below the minimum: the field and why
    assert "credits" in out and "100" in out


def test_a_payout_requested_and_decided_from_the_command_line(runner: CliRunner, live_server: Any) -> None:
    provider = earning_provider(3_000_000)
    owner = ("--url", live_server.url, "--api-key", api_key_create(user=provider.user).raw)
    staff_user = user_create(username="payer", is_staff=True)
    staff = ("--url", live_server.url, "--api-key", api_key_create(user=staff_user).raw)

    out = run(runner, "payouts", "request", "--provider", str(provider.pk), "2.5", *owner)
    assert "2.500000 credits requested" in out
    request = PayoutRequest.objects.get()
    out = run(runner, "payouts", "request", "--provider", str(provider.pk), "1", *owner, ok=False)
    assert "500000 micro-credits of earnings available" in out
    out = run(runner, "payouts", "approve", str(request.pk), *owner, ok=False)  # the owner is not staff
    assert "staff" in out
    run(runner, "payouts", "approve", str(request.pk), *staff)
    run(runner, "payouts", "paid", str(request.pk), "--reference", "wire-9", *staff)
    out = run(runner, "payouts", "list", *owner)
    assert "paid" in out and "wire-9" in out and "2.500000" in out
    assert json.loads(run(runner, "payouts", "list", "--json", *owner))[0]["state"] == "paid"
