"""The ``hivemart`` marketplace commands against a live marketplace over a real socket."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from client_sdk.money import format_credits
from hivemart.cli import cli
from marketplace.accounts.services import api_key_create, user_create
from marketplace.ledger.services import credit_grant, wallet_get_or_create


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


def test_credits_are_formatted_exactly() -> None:
    assert format_credits(1_500_000) == "1.500000"
    assert format_credits(7) == "0.000007"
    assert format_credits(-2_000_001) == "-2.000001"


def test_login_keys_jobs_and_balance(runner: CliRunner, live_server, tmp_path: Path) -> None:
    user = user_create(username="alice")
    credit_grant(account=wallet_get_or_create(user=user), amount=5_000_000)
    key = api_key_create(user=user).raw

    out = run(runner, "login", "--url", live_server.url, "--api-key", key)
    assert "logged in" in out and "alice" in out
    config = tmp_path / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text())["api_key"] == key

    me = json.loads(run(runner, "whoami", "--json"))
    assert me["username"] == "alice" and me["wallet_balance"] == 5_000_000
    assert "5.000000 credits" in run(runner, "balance")

    created = json.loads(run(runner, "keys", "create", "--name", "ci", "--json"))
    listed = json.loads(run(runner, "keys", "list", "--json"))
    assert {k["id"] for k in listed} >= {created["id"]}
    run(runner, "keys", "revoke", str(created["id"]))
    assert not next(k for k in json.loads(run(runner, "keys", "list", "--json")) if k["id"] == created["id"])["active"]

    assert json.loads(run(runner, "jobs", "list", "--json")) == []
    out = run(runner, "jobs", "create", "--model", "no-such-model", "--budget", "1000", "--max-price", "10", ok=False)
    assert "Error" in out

    run(runner, "logout")
    assert json.loads(config.read_text())["api_key"] is None


def test_errors_say_what_to_do(runner: CliRunner, live_server) -> None:
    out = run(runner, "whoami", "--url", live_server.url, "--api-key", "hm_not_a_key", ok=False)
    assert "hivemart login" in out
    out = run(runner, "whoami", "--url", "http://127.0.0.1:9", "--api-key", "x", ok=False)
    assert "cannot reach the marketplace" in out and "--url" in out
    out = runner.invoke(cli, ["login", "--url", live_server.url], input="").output
    assert "no API key" in out


def test_a_rejected_request_names_each_bad_field(runner: CliRunner, live_server) -> None:
    user = user_create(username="carol")
    key = api_key_create(user=user).raw
    out = run(
        runner,
        *("jobs", "create", "--model", "m", "--budget", "-5", "--max-price", "10"),
        *("--url", live_server.url, "--api-key", key),
        ok=False,
    )
    assert "budget:" in out and "see extra.fields" not in out


@pytest.mark.parametrize("suffix", ["/", "/api", "/api/", "//api//"])
def test_the_marketplace_url_may_end_in_api(runner: CliRunner, live_server, suffix: str) -> None:
    # `--url https://m.example/api/` is what people paste from the API docs; it must not ask for /api/api/me/.
    user = user_create(username="dave")
    key = api_key_create(user=user).raw
    assert (
        json.loads(run(runner, "whoami", "--url", live_server.url + suffix, "--api-key", key, "--json"))["username"]
        == "dave"
    )


def test_a_url_without_a_scheme_is_refused_in_one_line(runner: CliRunner) -> None:
    out = run(runner, "whoami", "--url", "market.example", "--api-key", "x", ok=False)
    assert "must start with http:// or https://" in out


def test_paid_generation_without_the_credits_names_the_budget_flag(
    live_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    import click

    from hivemart.cli._jobs import open_paid_job
    from tests.marketplace.factories import make_model

    model = make_model()
    key = api_key_create(user=user_create(username="erin")).raw  # an empty wallet
    monkeypatch.setenv("HIVEMART_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("HIVEMART_API_KEY", key)
    swarm_model = SimpleNamespace(info=SimpleNamespace(model_id=model.model_id))
    with pytest.raises(click.ClickException) as caught:
        open_paid_job(
            swarm_model, base_url=live_server.url, budget=5_000_000, max_price=10, kind="inference", job_id=None
        )
    message = caught.value.message
    assert "insufficient_credits" in message and "--budget (5000000 micro-credits)" in message


def test_jobs_create_keeps_the_client_key_that_job_runs_need(
    runner: CliRunner, live_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`jobs create` binds a fresh client key into the job and keeps it (0600) where
    `generate --job` / `finetune --job` look; a job without a kept key, or of the other kind,
    is refused with what to do instead."""
    from types import SimpleNamespace

    import click

    from hivemart.cli._jobs import job_key_path, open_paid_job, paid_options_check
    from hivemart_core.protocol.identity import Identity
    from marketplace.jobs.models import Job
    from tests.marketplace.factories import make_model

    model = make_model()
    user = user_create(username="jobber")
    credit_grant(account=wallet_get_or_create(user=user), amount=50_000_000)
    key = api_key_create(user=user).raw
    run(runner, "login", "--url", live_server.url, "--api-key", key)
    out = run(runner, "jobs", "create", "--model", model.model_id, "--budget", "1000000", "--max-price", "10")
    job = Job.objects.get(user=user)
    assert f"job {job.pk} created" in out and f"--job {job.pk}" in out
    path = job_key_path(live_server.url, job.pk)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).public_key.hex() == job.client_key

    swarm_model = SimpleNamespace(info=SimpleNamespace(model_id=model.model_id))
    path.unlink()  # as on another machine
    with pytest.raises(click.ClickException) as caught:
        open_paid_job(swarm_model, base_url=None, budget=1, max_price=1, kind="inference", job_id=job.pk)
    assert "no client key for job" in caught.value.message and "--paid" in caught.value.message

    with pytest.raises(click.UsageError, match="give one of them"):
        paid_options_check(True, job.pk)


def test_models_register_and_show(runner: CliRunner, live_server, tmp_path: Path) -> None:
    from hivemart_core.models import create_model, load_model_info

    staff = user_create(username="ops", is_staff=True)
    key = api_key_create(user=staff).raw
    path = create_model(tmp_path / "m", hidden=64, layers=2, seed=3)
    out = json.loads(run(runner, "models", "register", str(path), "--url", live_server.url, "--api-key", key, "--json"))
    model_id = load_model_info(path).model_id
    assert out["model_id"] == model_id and out["num_blocks"] == 2
    shown = json.loads(run(runner, "models", "show", model_id, "--url", live_server.url, "--api-key", key, "--json"))
    assert shown["model"]["model_id"] == model_id and shown["offers"] == []
    assert model_id in run(runner, "models", "list", "--url", live_server.url, "--api-key", key)
    assert run(runner, "providers", "list", "--url", live_server.url, "--api-key", key).strip() == "(none)"

    user_key = api_key_create(user=user_create(username="bob")).raw
    out = run(runner, "models", "register", str(path), "--url", live_server.url, "--api-key", user_key, ok=False)
    assert "staff" in out


def test_providers_list_and_show_cover_the_whole_market(runner: CliRunner, live_server) -> None:
    from marketplace.providers.services import provider_measurement_record
    from tests.marketplace.factories import make_model, make_provider

    alice = user_create(username="alice")
    key = api_key_create(user=alice).raw
    model = make_model(num_blocks=6)
    theirs = make_provider(model=model, price=1_500, name="bobs-gpu", start=0, end=4)
    provider_measurement_record(provider=theirs, throughput=886.5452454739941, latency_ms=17.23, success_rate=1.0)
    mine = make_provider(model=model, user=alice, price=2_000, name="alices-gpu")
    auth = ("--url", live_server.url, "--api-key", key)

    listing = run(runner, "providers", "list", *auth)  # not "(none)": everyone's providers, as on the web
    assert "bobs-gpu" in listing and "alices-gpu (yours)" in listing
    assert "886.5 tokens/s/block" in listing and "886.545" not in listing
    assert "0.006000" in listing  # 1500 per M units x 4 blocks, in credits per million tokens
    assert "since it registered" in listing  # uptime over its real age, with the window stated
    assert "bobs-gpu" not in run(runner, "providers", "list", "--mine", *auth)

    shown = run(runner, "providers", "show", str(theirs.pk), *auth)  # another's provider: no 404
    assert "17.2 ms/token" in shown and "0.001500 credits/M units" in shown and "earnings account" not in shown
    own = run(runner, "providers", "show", str(mine.pk), *auth)
    assert f"earnings account     {mine.earnings_account_id}" in own

    models = run(runner, "models", "show", model.model_id, *auth)
    # Blocks 0-3 at bob's 1500, blocks 4-5 only at alice's 2000 per million units.
    assert "whole model from 0.010000 credits/M tokens" in models and "886.5 tokens/s/block" in models
    assert "0.010000 credits/M tokens" in run(runner, "models", "list", *auth)


def test_jobs_show_the_marketplaces_money_and_why_a_job_failed(runner: CliRunner, live_server) -> None:
    from marketplace.jobs.services import job_transition
    from tests.marketplace.test_job_money_and_public_providers import NO_PLAN, failed_job, running_job

    done, _ = running_job(charge=300_000)
    job_transition(job=done, to_state="settling")
    job_transition(job=done, to_state="done")
    key = api_key_create(user=done.user).raw
    shown = run(runner, "jobs", "show", str(done.pk), "--url", live_server.url, "--api-key", key)
    header, row = shown.splitlines()[0], shown.splitlines()[2]
    assert header.split() == ["id", "kind", "model", "state", "budget", "held", "spent", "refunded", "created"]
    # Held 0 on a done job (it said "held 5.000000", the placed amount), as the web's job page says.
    assert row.split()[3:8] == ["done", "1.000000", "0.000000", "0.300000", "0.700000"]

    failed = failed_job()
    key = api_key_create(user=failed.user).raw
    auth = ("--url", live_server.url, "--api-key", key)
    shown = run(runner, "jobs", "show", str(failed.pk), *auth)
    assert f"job {failed.pk} failed: {NO_PLAN}" in shown
    assert "hint: create the job again with --max-price 500000 or more" in shown
    assert NO_PLAN in run(runner, "jobs", "list", *auth)
    # stdout only: the live server runs in this process, and its request log lines go to stderr.
    out = runner.invoke(cli, ["jobs", "show", str(failed.pk), "--json", *auth], catch_exceptions=False).stdout
    assert json.loads(out)["job"]["failure_reason"] == NO_PLAN


def test_a_paid_runs_summary_reads_in_credits() -> None:
    from hivemart.cli.generate import paid_summary
    from hivemart_core.api import JobCost

    summary = {
        "job": 7,
        "state": "settling",
        "receipts": {"countersigned": 4, "refused": {}, "disputed": 0, "sessions": 2, "units_received": 96, "cost": 3},
    }
    job = SimpleNamespace(cost=JobCost(held=4_999_997, spent=0, refunded=0))
    text = paid_summary(summary, job)  # type: ignore[arg-type]
    assert "{" not in text and "'upload'" not in text  # not a Python dict
    assert "96 work units in 2 session(s), 4 receipt(s) countersigned" in text
    assert "cost: 0.000003 credits" in text and "still held 4.999997" in text and "hivemart jobs show 7" in text


def test_a_refusal_for_want_of_a_ticket_names_the_flags_of_that_command() -> None:
    from hivemart.cli._jobs import ticket_hint

    refused = "provider 12D3 refused: ticket_required (the provider serves paid jobs only)"
    assert "`hivemart finetune` with --paid" in ticket_hint(refused, "finetune")
    assert "--job ID" in ticket_hint(refused, "generate")
    assert ticket_hint("connection refused", "generate") == "connection refused"
