"""``hivemart`` commands that talk to the marketplace: login, keys, models, providers, jobs, balance.

Every command takes ``--url`` and ``--api-key`` (else ``HIVEMART_URL`` / ``HIVEMART_API_KEY``,
else what ``hivemart login`` saved) and ``--json`` for scripting: one JSON document on stdout.
API errors become one line that says what to do, with exit status 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from hivemart.cli._config import CliConfig, config_path, load_config, save_config
from hivemart.cli._jobs import new_job_identity, save_job_identity
from hivemart.cli._root import api_error_text, cli, failure_hint
from hivemart_core.api import Client
from hivemart_core.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from hivemart_core.figures import (
    cheapest_price_per_million_tokens,
    format_credits,
    format_latency,
    format_percent,
    format_price,
    format_price_per_million_tokens,
    format_throughput,
    price_per_million_tokens,
)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _hint(error: APIError, config: CliConfig) -> str:
    if isinstance(error, APIConnectionError):
        return (
            f"cannot reach the marketplace at {config.base_url}: {error}. Is it running? "
            f"Pass --url or set HIVEMART_URL."
        )
    if isinstance(error, AuthenticationError):
        return f"{error} Log in with `hivemart login --url {config.base_url} --api-key KEY` or set HIVEMART_API_KEY."
    if isinstance(error, InsufficientCreditsError):
        return f"{error} Check `hivemart balance`; ask an operator for credits or lower --budget."
    if isinstance(error, ValidationError):
        return api_error_text(error)
    if isinstance(error, PermissionDeniedError):
        return f"{error} This needs another account's key (a staff key for catalog changes)."
    if isinstance(error, NotFoundError):
        return f"{error} List what exists with the matching `list` command."
    return str(error)


def market_command(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--url``/``--api-key``/``--json``, build the client, and turn API errors into hints."""

    @click.option("--url", "base_url", metavar="URL", help="Marketplace address (default: saved, or HIVEMART_URL).")
    @click.option("--api-key", metavar="KEY", help="API key (default: saved, or HIVEMART_API_KEY).")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for scripts).")
    @functools.wraps(function)
    def wrapper(base_url: str | None, api_key: str | None, as_json: bool, **kwargs: Any) -> Any:
        try:
            config = load_config(base_url=base_url, api_key=api_key)
        except ValueError as e:
            raise click.ClickException(str(e)) from e
        with Client(api_key=config.api_key, base_url=config.base_url, max_retries=1) as client:
            try:
                result = function(client=client, config=config, **kwargs)
            except APIError as e:
                raise click.ClickException(_hint(e, config)) from e
        if result is None:
            return
        if as_json:
            click.echo(json.dumps(_jsonable(result.data)))
        else:
            click.echo(result.text)

    return wrapper


@dataclasses.dataclass
class Output:
    data: Any  # what --json prints
    text: str  # what a person reads


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]) if rows else "(none)"


# --- login --------------------------------------------------------------------------------


@cli.command()
@click.option("--url", "base_url", metavar="URL", help="Marketplace address, e.g. http://127.0.0.1:8000.")
@click.option(
    "--api-key", metavar="KEY", help="An API key (create one on the web site or with `hivemart keys create`)."
)
def login(base_url: str | None, api_key: str | None) -> None:
    """Check an API key against the marketplace and remember both."""
    config = load_config(base_url=base_url, api_key=api_key)
    if not config.api_key:
        if not sys.stdin.isatty():
            raise click.ClickException("no API key: pass --api-key KEY or set HIVEMART_API_KEY")
        config = dataclasses.replace(config, api_key=click.prompt("API key", hide_input=True))
    with Client(api_key=config.api_key, base_url=config.base_url, max_retries=1) as client:
        try:
            me = client.accounts.me()
        except APIError as e:
            raise click.ClickException(_hint(e, config)) from e
    path = save_config(dataclasses.replace(config, username=me.username))
    click.echo(f"logged in to {config.base_url} as {me.username}; saved in {path}")


@cli.command()
def logout() -> None:
    """Forget the saved API key."""
    config = load_config()
    save_config(dataclasses.replace(config, api_key=None, username=None))
    click.echo(f"logged out; {config_path()} keeps only the marketplace address")


@cli.command()
@click.option("--username", required=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--email", default="")
@market_command
def signup(client: Client, config: CliConfig, username: str, password: str, email: str) -> Output:
    """Create an account and log in with its first API key."""
    result = client.accounts.signup(username=username, password=password, email=email)
    save_config(dataclasses.replace(config, api_key=result.api_key.key, username=result.user.username))
    return Output(
        {"user": result.user, "api_key_prefix": result.api_key.prefix},
        f"created {result.user.username} and logged in (key {result.api_key.prefix}...)",
    )


@cli.command()
@market_command
def whoami(client: Client, config: CliConfig) -> Output:
    """Show the account of the current API key."""
    me = client.accounts.me()
    return Output(
        me,
        f"{me.username} at {config.base_url}{' (staff)' if me.is_staff else ''}; "
        f"balance {format_credits(me.wallet_balance)} credits",
    )


@cli.command()
@click.option("--postings", default=10, show_default=True, help="How many recent ledger entries to show.")
@market_command
def balance(client: Client, config: CliConfig, postings: int) -> Output:
    """Wallet balance and the latest ledger entries."""
    me = client.accounts.me()
    wallet = next((a for a in client.ledger.accounts(page_size=100).items if a.kind == "wallet"), None)
    entries = client.ledger.postings(account=wallet.id, page_size=postings).items if wallet and postings else []
    text = f"{format_credits(me.wallet_balance)} credits ({me.wallet_balance} micro-credits)"
    if entries:
        text += "\n\n" + table(
            ((p.created_at.strftime("%Y-%m-%d %H:%M:%S"), p.kind, format_credits(p.amount), p.memo) for p in entries),
            ("when", "kind", "credits", "memo"),
        )
    return Output({"balance": me.wallet_balance, "postings": entries}, text)


# --- keys ---------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Your API keys."""


@keys.command("list")
@market_command
def keys_list(client: Client, config: CliConfig) -> Output:
    items = list(client.keys.iter())
    return Output(
        items,
        table(
            ((k.id, k.name, k.prefix + "...", "yes" if k.active else "revoked", k.last_used_at) for k in items),
            ("id", "name", "prefix", "active", "last used"),
        ),
    )


@keys.command("create")
@click.option("--name", default="", help="A label to recognise it by.")
@market_command
def keys_create(client: Client, config: CliConfig, name: str) -> Output:
    """Create a key; it is shown once."""
    created = client.keys.create(name=name)
    return Output(
        created, f"{created.key}\n(shown once: store it now; `hivemart keys revoke {created.id}` disables it)"
    )


@keys.command("revoke")
@click.argument("key_id", type=int)
@market_command
def keys_revoke(client: Client, config: CliConfig, key_id: int) -> Output:
    key = client.keys.revoke(key_id)
    return Output(key, f"revoked key {key.id} ({key.prefix}...)")


# --- models -------------------------------------------------------------------------------


@cli.group()
def models() -> None:
    """Models in the marketplace's catalog."""


def _cheapest(model: Any, offers: Sequence[Any]) -> str:
    """What a million tokens cost through the whole model at the cheapest online offers."""
    micro = cheapest_price_per_million_tokens(model.num_blocks, [(o.block_start, o.block_end, o.price) for o in offers])
    return "not every block is served" if micro is None else format_price_per_million_tokens(micro)


@models.command("list")
@market_command
def models_list(client: Client, config: CliConfig) -> Output:
    items = list(client.models.iter())
    cheapest = {m.model_id: _cheapest(m, client.models.offers(m.model_id)) for m in items}
    return Output(
        items,
        table(
            ((m.model_id, m.arch, m.num_blocks, m.hidden_size, m.dtype, cheapest[m.model_id]) for m in items),
            ("model", "arch", "blocks", "hidden", "dtype", "whole model from"),
        ),
    )


def _offer_figures(offer: Any) -> tuple[str, str, str]:
    """Throughput and latency with units, and where they come from."""
    source = "probe" if offer.measured else "self-reported" if offer.throughput is not None else ""
    return format_throughput(offer.throughput), format_latency(offer.latency_ms), source


@models.command("show")
@click.argument("model_id")
@market_command
def models_show(client: Client, config: CliConfig, model_id: str) -> Output:
    model = client.models.get(model_id)
    offers = client.models.offers(model_id)
    text = "\n".join(f"{k:<15} {v}" for k, v in _jsonable(model).items() if k != "block_digests")
    text += f"\n{'whole model from':<15} {_cheapest(model, offers)}"
    text += "\n\noffers (prices in credits)\n" + table(
        (
            (
                o.peer_id[-12:],
                f"{o.block_start}:{o.block_end}",
                format_credits(o.price),
                format_credits(price_per_million_tokens(o.price, o.block_end - o.block_start)),
                *_offer_figures(o),
            )
            for o in offers
        ),
        ("provider", "blocks", "per M units", "span per M tokens", "throughput", "latency", "figures from"),
    )
    return Output({"model": model, "offers": offers}, text)


@models.command("register")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", default="", help="A human-readable name.")
@market_command
def models_register(client: Client, config: CliConfig, path: Path, name: str) -> Output:
    """Add a local checkpoint to the catalog (staff): its id, shape and digests."""
    from hivemart_core.models import compute_digests, load_model_info

    info = load_model_info(path)
    digests = compute_digests(path)
    model = client.models.create(
        model_id=info.model_id,
        arch=info.arch,
        num_blocks=info.num_blocks,
        hidden_size=info.hidden_size,
        dtype=str(info.torch_dtype).removeprefix("torch."),
        weights_digest=digests["model"],
        block_digests=digests["blocks"],
        client_digest=digests["client"],
        name=name,
    )
    return Output(model, f"registered {model.model_id} ({model.num_blocks} blocks)")


# --- providers ----------------------------------------------------------------------------


@cli.group()
def providers() -> None:
    """Providers selling compute."""


@providers.command("list")
@click.option("--model", "model_id", help="Only providers of this model.")
@click.option("--online", is_flag=True, help="Only online, unsuspended providers.")
@click.option("--mine", is_flag=True, help="Only your own providers.")
@market_command
def providers_list(client: Client, config: CliConfig, model_id: str | None, online: bool, mine: bool) -> Output:
    """Every provider in the market (public fields, as on the web's providers page), online first."""
    items = [p for p in client.providers.iter_market(model=model_id, online=online) if p.mine or not mine]
    return Output(
        items,
        table(
            (
                (
                    p.id,
                    (p.name or p.peer_id[-12:]) + (" (yours)" if p.mine else ""),
                    p.model,
                    f"{p.block_start}:{p.block_end}",
                    format_credits(p.price),
                    format_credits(p.price_per_million_tokens),
                    p.state + (", suspended" if p.suspended else ""),
                    format_throughput(p.throughput)
                    + ("" if p.measured or p.throughput is None else " (self-reported)"),
                    p.uptime.text,
                )
                for p in items
            ),
            ("id", "provider", "model", "blocks", "per M units", "span per M tokens", "state", "throughput", "uptime"),
        ),
    )


@providers.command("show")
@click.argument("provider_id", type=int)
@market_command
def providers_show(client: Client, config: CliConfig, provider_id: int) -> Output:
    """Any provider's public fields; for your own, also its account and self-reported figures."""
    public = client.providers.get_public(provider_id)
    rows = [
        ("id", public.id),
        ("peer id", public.peer_id),
        ("name", public.name or "–"),
        ("model", f"{public.model}, blocks {public.block_start}:{public.block_end}"),
        ("price", f"{format_price(public.price)} ({format_price_per_million_tokens(public.price_per_million_tokens)})"),
        ("state", public.state + (", suspended" if public.suspended else "")),
        ("throughput", format_throughput(public.throughput)),
        ("latency", format_latency(public.latency_ms)),
        ("figures from", f"probe at {public.measured_at:%Y-%m-%d %H:%M:%S}" if public.measured_at else "self-reported"),
        ("probe success", format_percent(public.success_rate)),
        ("uptime", public.uptime.text),
        ("reputation", f"{public.reputation} / 100"),
        (
            "hardware",
            ", ".join(
                x
                for x in (public.gpu, f"{public.gpu_memory_mb} MiB" if public.gpu_memory_mb else "", public.region)
                if x
            )
            or "–",
        ),
        ("last heartbeat", f"{public.last_heartbeat_at:%Y-%m-%d %H:%M:%S}" if public.last_heartbeat_at else "never"),
        ("registered", f"{public.registered_at:%Y-%m-%d %H:%M:%S}"),
    ]
    data: dict[str, Any] = {"provider": public, "own": None}
    if public.mine:
        own = client.providers.get(provider_id)
        data["own"] = own
        rows += [
            ("yours", "yes"),
            ("earnings account", own.earnings_account),
            ("reported throughput", format_throughput(own.reported_throughput)),
            ("suspension reason", own.suspension_reason or "–"),
        ]
    return Output(data, "\n".join(f"{k:<20} {v}" for k, v in rows))


# --- jobs ---------------------------------------------------------------------------------


@cli.group()
def jobs() -> None:
    """Your jobs: their state, plan and cost."""


def _job_row(job: Any) -> tuple:
    cost = job.cost
    return (
        job.id,
        job.kind,
        job.model,
        job.state,
        format_credits(job.budget),
        format_credits(cost.held) if cost else "",
        format_credits(cost.spent) if cost else "",
        format_credits(cost.refunded) if cost else "",
        job.created_at.strftime("%Y-%m-%d %H:%M"),
    )


# held/spent/refunded are the marketplace's one computation (the web's job page shows the same).
_JOB_HEADERS = ("id", "kind", "model", "state", "budget", "held", "spent", "refunded", "created")


def _failure_lines(jobs: Iterable[Any]) -> str:
    """A line per failed job: why, and the flag that would change it."""
    lines = []
    for job in jobs:
        if job.state == "failed":
            hint = failure_hint(job.failure_reason)
            lines.append(f"job {job.id} failed: {job.failure_reason or 'no reason recorded'}")
            if hint:
                lines.append(f"  hint: {hint}")
    return "\n".join(lines)


@jobs.command("list")
@click.option("--state", help="Only jobs in this state.")
@market_command
def jobs_list(client: Client, config: CliConfig, state: str | None) -> Output:
    """Your jobs, newest first, with what each holds and spent (credits); why failed ones failed."""
    items = list(client.jobs.iter(state=state))
    text = table(map(_job_row, items), _JOB_HEADERS)
    if failures := _failure_lines(items):
        text += "\n\n" + failures
    return Output(items, text)


@jobs.command("show")
@click.argument("job_id", type=int)
@market_command
def jobs_show(client: Client, config: CliConfig, job_id: int) -> Output:
    """A job: its money (credits), why it failed if it did, and its plan."""
    job = client.jobs.get(job_id)
    text = table([_job_row(job)], _JOB_HEADERS)
    if failures := _failure_lines([job]):
        text += "\n\n" + failures
    plan = None
    if job.state not in ("pending", "cancelled"):
        try:
            plan = client.jobs.plan(job_id)
        except NotFoundError:
            plan = None
    if plan is not None:
        text += f"\n\nplan v{plan.version}: {plan.reason}\n" + table(
            (
                (
                    s.index,
                    f"{s.block_start}:{s.block_end}",
                    s.peer_id[-12:],
                    format_credits(s.price),
                    ", ".join(b.peer_id[-8:] for b in s.backups),
                )
                for s in plan.segments
            ),
            ("segment", "blocks", "provider", "credits per M units", "backups"),
        )
    return Output({"job": job, "plan": plan}, text)


@jobs.command("create")
@click.option("--model", "model_id", required=True, help="Catalog model id (see `hivemart models list`).")
@click.option("--kind", type=click.Choice(["inference", "finetune"]), default="inference", show_default=True)
@click.option("--budget", type=int, required=True, help="Micro-credits to hold for the job.")
@click.option("--max-price", type=int, required=True, help="Highest price, micro-credits per million work units.")
@market_command
def jobs_create(client: Client, config: CliConfig, model_id: str, kind: str, budget: int, max_price: int) -> Output:
    """Create a job and hold its budget; run it with `hivemart generate --job ID` (inference) or
    `hivemart finetune --job ID` (finetune). Its client key is kept on this machine for that."""
    identity = new_job_identity()
    job = client.jobs.create(
        model=model_id, kind=kind, budget=budget, max_price=max_price, client_key=identity.public_key
    )
    key = save_job_identity(identity, config.base_url, job.id)
    run = "generate PROMPT" if kind == "inference" else "finetune --data FILE"
    return Output(
        job,
        f"job {job.id} created ({job.state}); {format_credits(budget)} credits held\n"
        f"run it: hivemart {run} --model PATH --initial-peers MADDR --job {job.id}  (client key: {key})",
    )


@jobs.command("cancel")
@click.argument("job_id", type=int)
@click.option("--reason", default="")
@market_command
def jobs_cancel(client: Client, config: CliConfig, job_id: int, reason: str) -> Output:
    job = client.jobs.cancel(job_id, reason=reason)
    return Output(job, f"job {job.id} is {job.state}")
