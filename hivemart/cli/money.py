"""``hivemart wallet topup|topups`` (buy credits) and ``hivemart payouts ...`` (earnings out).

A top-up answers a checkout address to pay at (Stripe's page; on a marketplace running the
test payment provider, ``--test-pay`` pays it at once). A payout request holds the amount
until staff approve it (``payouts approve``/``reject``/``paid``, staff keys only).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import click

from client_sdk.money import MICRO_PER_CREDIT, format_credits
from hivemart.cli._config import CliConfig
from hivemart.cli._root import cli
from hivemart.cli.market import Output, market_command, table
from hivemart_core.api import Client


def credits_to_micro(text: str) -> int:
    """``"1.5"`` credits -> 1500000 micro-credits, exactly (at most six decimals, more than zero)."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise click.BadParameter(f"{text!r} is not a number of credits (e.g. 12.5)") from None
    micro = amount * MICRO_PER_CREDIT
    if not amount.is_finite() or micro != micro.to_integral_value() or micro <= 0:
        raise click.BadParameter(f"{text!r}: credits are more than 0, with at most six decimals")
    return int(micro)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "–"


# --- wallet ---------------------------------------------------------------------------------


@cli.group()
def wallet() -> None:
    """Buy credits (top-ups) and see them arrive."""


@wallet.command("topup")
@click.argument("credits", type=click.IntRange(min=1))
@click.option("--test-pay", is_flag=True, help="Pay at once (only on a marketplace running the test payment provider).")
@market_command
def wallet_topup(client: Client, config: CliConfig, credits: int, test_pay: bool) -> Output:
    """Buy CREDITS whole credits: prints the checkout address to pay at."""
    topup = client.payments.topup(credits=credits)
    price = f"{topup.amount_minor} {topup.currency.upper()} minor units"
    if test_pay:
        topup = client.payments.test_pay(topup.id)
        return Output(
            topup, f"top-up #{topup.id}: {format_credits(topup.credits)} credits {topup.state} (test payment)"
        )
    return Output(
        topup,
        f"top-up #{topup.id}: {format_credits(topup.credits)} credits for {price} ({topup.provider}).\n"
        f"Pay at: {topup.checkout_url}\n"
        f"The credits arrive when the payment is confirmed; check with `hivemart wallet topups`.",
    )


@wallet.command("topups")
@market_command
def wallet_topups(client: Client, config: CliConfig) -> Output:
    """Your top-ups and their states (pending, paid, expired)."""
    topups = client.payments.topups(page_size=50).items
    rows = (
        (t.id, t.provider, format_credits(t.credits), f"{t.amount_minor} {t.currency}", t.state, _when(t.created_at))
        for t in topups
    )
    return Output(topups, table(rows, ("id", "provider", "credits", "price (minor)", "state", "started")))


# --- payouts --------------------------------------------------------------------------------


@cli.group()
def payouts() -> None:
    """Ask for a provider's earnings to be paid out; staff approve, reject, mark paid."""


def _payout_rows(requests: list[Any]) -> str:
    rows = (
        (r.id, r.provider, format_credits(r.amount), r.state, r.note or "–", _when(r.created_at), _when(r.decided_at))
        for r in requests
    )
    return table(rows, ("id", "provider", "credits", "state", "note", "requested", "decided"))


@payouts.command("request")
@click.option("--provider", "provider_id", type=click.IntRange(min=1), required=True, help="Your provider's id.")
@click.option("--memo", default="", help="A note for staff (e.g. where the money goes).")
@click.argument("credits")
@market_command
def payouts_request(client: Client, config: CliConfig, provider_id: int, memo: str, credits: str) -> Output:
    """Ask for CREDITS (e.g. 12.5) of a provider's earnings to be paid out."""
    request = client.payouts.request(provider=provider_id, amount=credits_to_micro(credits), memo=memo)
    return Output(
        request,
        f"payout request #{request.id}: {format_credits(request.amount)} credits {request.state}; "
        "held until staff approve it (`hivemart payouts list` shows its state)",
    )


@payouts.command("list")
@market_command
def payouts_list(client: Client, config: CliConfig) -> Output:
    """Your payout requests (staff: everyone's) and their states."""
    requests = client.payouts.list(page_size=50).items
    return Output(requests, _payout_rows(requests))


@payouts.command("approve")
@click.argument("request_id", type=click.IntRange(min=1))
@click.option("--note", default="")
@market_command
def payouts_approve(client: Client, config: CliConfig, request_id: int, note: str) -> Output:
    """Staff: approve a request (its credits leave the platform; send the money, then `payouts paid`)."""
    request = client.payouts.approve(request_id, note=note)
    return Output(request, _payout_rows([request]))


@payouts.command("reject")
@click.argument("request_id", type=click.IntRange(min=1))
@click.option("--note", default="", help="Why (the provider sees it).")
@market_command
def payouts_reject(client: Client, config: CliConfig, request_id: int, note: str) -> Output:
    """Staff: reject a request (its credits return to the provider's earnings)."""
    request = client.payouts.reject(request_id, note=note)
    return Output(request, _payout_rows([request]))


@payouts.command("paid")
@click.argument("request_id", type=click.IntRange(min=1))
@click.option("--reference", required=True, help="The outside payment's id (bank transfer, ...).")
@market_command
def payouts_paid(client: Client, config: CliConfig, request_id: int, reference: str) -> Output:
    """Staff: record that an approved request's money was sent."""
    request = client.payouts.mark_paid(request_id, reference=reference)
    return Output(request, _payout_rows([request]))
