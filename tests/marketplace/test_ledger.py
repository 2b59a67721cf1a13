"""Ledger services and the database's own guarantees, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid

import pytest
from django.db import IntegrityError, connection, transaction

from marketplace.common.errors import Conflict, IdempotencyConflict, InsufficientCredits, NotFound, ValidationFailed
from marketplace.ledger.models import Account, Hold, Posting, Transaction
from marketplace.ledger.selectors import hold_captured, hold_left, ledger_verify, wallet_balance
from marketplace.ledger.services import (
    MAX_AMOUNT,
    credit_grant,
    fee_for,
    hold_capture,
    hold_place,
    hold_release,
    payout,
    platform_account,
    wallet_get_or_create,
)
from tests.marketplace.factories import make_earnings, make_user, make_wallet

pytestmark = pytest.mark.django_db


def balance(account: Account) -> int:
    return Account.objects.get(pk=account.pk).balance


def test_grant_moves_credits_from_the_external_account() -> None:
    wallet = make_wallet()
    tx = credit_grant(account=wallet, amount=5_000_000, memo="welcome")

    assert balance(wallet) == 5_000_000
    assert balance(platform_account(Account.Kind.EXTERNAL)) == -5_000_000
    assert sorted(tx.postings.values_list("amount", flat=True)) == [-5_000_000, 5_000_000]
    assert wallet_balance(user=wallet.user) == 5_000_000
    assert ledger_verify().consistent


@pytest.mark.parametrize("amount", [0, -1, MAX_AMOUNT + 1, 1.5, True, "10"])
def test_amounts_must_be_positive_bounded_integers(amount: object) -> None:
    wallet = make_wallet()
    with pytest.raises(ValidationFailed):
        credit_grant(account=wallet, amount=amount)  # type: ignore[arg-type]
    assert not Transaction.objects.exists()


def test_grant_only_into_wallets() -> None:
    with pytest.raises(ValidationFailed):
        credit_grant(account=make_earnings(), amount=10)


def test_grant_is_idempotent_by_key() -> None:
    wallet = make_wallet()
    first = credit_grant(account=wallet, amount=700, idempotency_key="grant-1")
    again = credit_grant(account=wallet, amount=700, idempotency_key="grant-1")
    assert again.pk == first.pk
    assert balance(wallet) == 700
    with pytest.raises(IdempotencyConflict):
        credit_grant(account=wallet, amount=701, idempotency_key="grant-1")


def test_hold_moves_credits_into_its_own_escrow() -> None:
    wallet = make_wallet(credits=1_000)
    hold = hold_place(account=wallet, amount=600, memo="job 1")

    assert balance(wallet) == 400
    assert hold.escrow.kind == Account.Kind.ESCROW and hold.escrow.user_id == wallet.user_id
    assert hold_left(hold=hold) == 600
    assert hold.state == Hold.State.OPEN
    assert ledger_verify().consistent


def test_hold_larger_than_the_wallet_is_refused_and_leaves_no_trace() -> None:
    wallet = make_wallet(credits=100)
    with pytest.raises(InsufficientCredits) as e:
        hold_place(account=wallet, amount=101)
    assert e.value.extra["balance"] == 100
    assert balance(wallet) == 100
    assert not Hold.objects.exists()
    assert not Account.objects.filter(kind=Account.Kind.ESCROW).exists()


def test_hold_place_is_idempotent_by_key() -> None:
    wallet = make_wallet(credits=1_000)
    first = hold_place(account=wallet, amount=300, idempotency_key="job:1")
    assert hold_place(account=wallet, amount=300, idempotency_key="job:1").pk == first.pk
    assert balance(wallet) == 700
    with pytest.raises(IdempotencyConflict):
        hold_place(account=wallet, amount=200, idempotency_key="job:1")


def test_capture_pays_the_provider_minus_the_platform_fee() -> None:
    hold = hold_place(account=make_wallet(credits=1_000_000), amount=1_000_000)
    earnings = make_earnings()
    hold_capture(hold=hold, amount=333_333, payee=earnings, idempotency_key="r1", fee_bps=500)

    fee = fee_for(333_333, 500)
    assert fee == 16_666  # rounded down, in the provider's favour
    assert balance(earnings) == 333_333 - fee
    assert balance(platform_account(Account.Kind.FEES)) == fee
    assert hold_left(hold=hold) == 1_000_000 - 333_333
    assert hold_captured(hold=hold) == 333_333
    assert ledger_verify().consistent


def test_capture_uses_the_configured_fee(settings) -> None:  # noqa: ANN001 - pytest-django fixture
    settings.HIVEMART_PLATFORM_FEE_BPS = 1_000
    hold = hold_place(account=make_wallet(credits=10_000), amount=10_000)
    earnings = make_earnings()
    hold_capture(hold=hold, amount=10_000, payee=earnings, idempotency_key="r1")
    assert balance(earnings) == 9_000
    assert balance(platform_account(Account.Kind.FEES)) == 1_000


def test_capture_without_fee_posts_two_legs() -> None:
    hold = hold_place(account=make_wallet(credits=50), amount=50)
    tx = hold_capture(hold=hold, amount=10, payee=make_earnings(), idempotency_key="r1", fee_bps=0)
    assert tx.postings.count() == 2


def test_capture_beyond_what_is_left_is_refused() -> None:
    hold = hold_place(account=make_wallet(credits=1_000), amount=1_000)
    earnings = make_earnings()
    hold_capture(hold=hold, amount=900, payee=earnings, idempotency_key="r1")
    with pytest.raises(InsufficientCredits) as e:
        hold_capture(hold=hold, amount=101, payee=earnings, idempotency_key="r2")
    assert e.value.extra == {"hold": hold.pk, "left": 100, "asked": 101}
    hold_capture(hold=hold, amount=100, payee=earnings, idempotency_key="r3")
    assert hold_left(hold=hold) == 0


def test_capture_is_idempotent_by_key() -> None:
    hold = hold_place(account=make_wallet(credits=1_000), amount=1_000)
    earnings = make_earnings()
    first = hold_capture(hold=hold, amount=400, payee=earnings, idempotency_key="receipt-7", fee_bps=0)
    again = hold_capture(hold=hold, amount=400, payee=earnings, idempotency_key="receipt-7", fee_bps=0)
    assert again.pk == first.pk
    assert balance(earnings) == 400
    with pytest.raises(IdempotencyConflict):
        hold_capture(hold=hold, amount=401, payee=earnings, idempotency_key="receipt-7", fee_bps=0)
    with pytest.raises(IdempotencyConflict):
        hold_capture(hold=hold, amount=400, payee=make_earnings(), idempotency_key="receipt-7", fee_bps=0)


def test_capture_needs_a_key_and_an_earnings_payee() -> None:
    hold = hold_place(account=make_wallet(credits=100), amount=100)
    with pytest.raises(ValidationFailed):
        hold_capture(hold=hold, amount=1, payee=make_earnings(), idempotency_key=None)  # type: ignore[arg-type]
    with pytest.raises(ValidationFailed):
        hold_capture(hold=hold, amount=1, payee=make_wallet(), idempotency_key="k")
    with pytest.raises(ValidationFailed):
        hold_capture(hold=hold, amount=1, payee=make_earnings(), idempotency_key="x" * 201)


def test_release_returns_the_rest_and_closes_the_hold() -> None:
    wallet = make_wallet(credits=1_000)
    hold = hold_place(account=wallet, amount=800)
    hold_capture(hold=hold, amount=300, payee=make_earnings(), idempotency_key="r1", fee_bps=0)

    tx = hold_release(hold=hold)
    assert tx is not None and tx.kind == Transaction.Kind.RELEASE
    assert balance(wallet) == 200 + 500
    assert hold_left(hold=hold) == 0
    hold.refresh_from_db()
    assert hold.state == Hold.State.CLOSED and hold.closed_at is not None

    assert hold_release(hold=hold) is None  # twice is harmless
    assert balance(wallet) == 700
    with pytest.raises(Conflict) as e:
        hold_capture(hold=hold, amount=1, payee=make_earnings(), idempotency_key="r2")
    assert e.value.code == "hold_closed"
    assert ledger_verify().consistent


def test_release_of_a_fully_captured_hold_moves_nothing() -> None:
    hold = hold_place(account=make_wallet(credits=10), amount=10)
    hold_capture(hold=hold, amount=10, payee=make_earnings(), idempotency_key="r1")
    assert hold_release(hold=hold) is None
    hold.refresh_from_db()
    assert hold.state == Hold.State.CLOSED


def test_payout_leaves_the_platform_through_the_external_account() -> None:
    hold = hold_place(account=make_wallet(credits=1_000), amount=1_000)
    earnings = make_earnings()
    hold_capture(hold=hold, amount=1_000, payee=earnings, idempotency_key="r1", fee_bps=0)
    payout(account=earnings, amount=600, idempotency_key="p1")
    assert balance(earnings) == 400
    assert balance(platform_account(Account.Kind.EXTERNAL)) == -1_000 + 600
    with pytest.raises(InsufficientCredits):
        payout(account=earnings, amount=401)
    with pytest.raises(ValidationFailed):
        payout(account=make_wallet(credits=5), amount=1)
    assert ledger_verify().consistent


def test_one_wallet_per_user() -> None:
    user = make_user()
    assert wallet_get_or_create(user=user).pk == wallet_get_or_create(user=user).pk
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.create(kind=Account.Kind.WALLET, user=user)


# --- what the database refuses on its own, whatever the Python code does ------------------


def test_database_refuses_a_negative_balance() -> None:
    wallet = make_wallet(credits=10)
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.filter(pk=wallet.pk).update(balance=-1)
    escrow = hold_place(account=wallet, amount=10).escrow
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.filter(pk=escrow.pk).update(balance=-5)


def test_database_allows_the_external_account_to_go_negative() -> None:
    external = platform_account(Account.Kind.EXTERNAL)
    Account.objects.filter(pk=external.pk).update(balance=-1)  # no error


def test_database_refuses_an_unbalanced_transaction() -> None:
    a, b = make_wallet(), make_wallet()
    tx_id = uuid.uuid4()
    with pytest.raises(IntegrityError), transaction.atomic():
        Posting.objects.bulk_create(
            [Posting(transaction_id=tx_id, account=a, amount=-5), Posting(transaction_id=tx_id, account=b, amount=4)]
        )
        Transaction.objects.create(id=tx_id, kind=Transaction.Kind.GRANT)


def test_database_refuses_a_header_without_postings() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        Transaction.objects.create(kind=Transaction.Kind.GRANT)


def test_database_refuses_changing_a_posting() -> None:
    tx = credit_grant(account=make_wallet(), amount=10)
    posting = tx.postings.first()
    with pytest.raises(IntegrityError), transaction.atomic():
        Posting.objects.filter(pk=posting.pk).update(amount=11)


def test_database_refuses_adding_a_posting_to_a_recorded_transaction() -> None:
    wallet = make_wallet()
    tx = credit_grant(account=wallet, amount=10)
    with pytest.raises(IntegrityError), transaction.atomic():
        Posting.objects.create(transaction=tx, account=wallet, amount=1)


def test_database_refuses_a_posting_without_a_transaction() -> None:
    wallet = make_wallet()
    with pytest.raises(IntegrityError), transaction.atomic():
        Posting.objects.create(transaction_id=uuid.uuid4(), account=wallet, amount=1)
        connection.check_constraints()  # what commit would do with the deferred foreign key


def test_database_refuses_a_reused_idempotency_key() -> None:
    wallet = make_wallet()
    credit_grant(account=wallet, amount=10, idempotency_key="k")
    tx_id = uuid.uuid4()
    external = platform_account(Account.Kind.EXTERNAL)
    with pytest.raises(IntegrityError), transaction.atomic():
        Posting.objects.bulk_create(
            [
                Posting(transaction_id=tx_id, account=external, amount=-1),
                Posting(transaction_id=tx_id, account=wallet, amount=1),
            ]
        )
        Transaction.objects.create(id=tx_id, kind=Transaction.Kind.GRANT, idempotency_key="system:k")


@pytest.mark.postgres
def test_postgres_rechecks_balance_at_commit_after_a_deleted_posting() -> None:
    tx = credit_grant(account=make_wallet(), amount=10)
    with pytest.raises(IntegrityError), transaction.atomic():
        Posting.objects.filter(pk=tx.postings.first().pk).delete()
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


@pytest.mark.postgres
def test_postgres_capture_function_matches_the_orm_implementation() -> None:
    """The same script of captures through ``ledger_capture()`` and through the ORM path
    (the one SQLite uses) gives the same outcomes and the same balances."""
    from marketplace.ledger import services

    script = [
        dict(amount=300, fee_bps=500, key="a"),
        dict(amount=300, fee_bps=500, key="a"),  # replay
        dict(amount=301, fee_bps=500, key="a"),  # same key, other movement
        dict(amount=100, fee_bps=10_000, key="b"),  # all to the platform
        dict(amount=1, fee_bps=0, key="c"),
        dict(amount=10_000, fee_bps=0, key="d"),  # more than is left
        dict(amount=599, fee_bps=250, key="e"),  # exactly what is left
        dict(amount=1, fee_bps=0, key="f"),  # nothing left
    ]

    def run(impl, tag: str) -> tuple[list[object], list[int]]:  # noqa: ANN001
        hold = hold_place(account=make_wallet(credits=1_000), amount=1_000)
        payee = make_earnings()
        fees = platform_account(Account.Kind.FEES)
        fees_before = balance(fees)
        outcomes: list[object] = []
        for step in script:
            try:
                tx = impl(
                    hold_id=hold.pk,
                    amount=step["amount"],
                    payee=payee,
                    fee=services.fee_for(step["amount"], step["fee_bps"]),
                    key=f"{tag}-{step['key']}",
                    memo="m",
                )
                outcomes.append(sorted(tx.postings.values_list("amount", flat=True)))
            except Exception as e:  # noqa: BLE001 - the type and code are what is compared
                outcomes.append((type(e).__name__, getattr(e, "code", None), getattr(e, "extra", {}).get("left")))
        hold_release(hold=hold)
        with pytest.raises(Conflict):
            impl(hold_id=hold.pk, amount=1, payee=payee, fee=0, key=f"{tag}-closed", memo="m")
        return outcomes, [balance(hold.escrow), balance(payee), balance(fees) - fees_before, balance(hold.payer)]

    with_function = run(services._hold_capture_postgres, "pg")
    with_orm = run(services._hold_capture_orm, "orm")
    assert with_function == with_orm
    assert with_function[1] == [0, 300 - 15 + 1 + 599 - 14, 15 + 100 + 14, 0]
    assert ledger_verify().consistent
    with pytest.raises(NotFound):
        services._hold_capture_postgres(hold_id=10**12, amount=1, payee=make_earnings(), fee=0, key="x", memo="")
