"""Reads from the ledger."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db.models import Q, QuerySet, Sum

from marketplace.accounts.models import User
from marketplace.common.errors import NotFound
from marketplace.ledger.models import Account, Hold, Posting, Transaction


def accounts_visible_to(*, user: User) -> QuerySet[Account]:
    """A user's own accounts (wallet, earnings, escrows of their holds); staff see every account."""
    accounts = Account.objects.all()
    return accounts if user.is_staff else accounts.filter(user=user)


def account_get(*, user: User, account_id: int) -> Account:
    try:
        return accounts_visible_to(user=user).get(pk=account_id)
    except Account.DoesNotExist:
        raise NotFound(f"no account {account_id}") from None


def wallet_balance(*, user: User) -> int:
    """The user's wallet balance in micro-credits (0 before the wallet exists)."""
    balance = Account.objects.filter(kind=Account.Kind.WALLET, user=user).values_list("balance", flat=True).first()
    return balance or 0


def postings_visible_to(*, user: User) -> QuerySet[Posting]:
    """Postings on the user's own accounts, newest first; staff see all of them."""
    postings = Posting.objects.select_related("transaction", "account").order_by("-id")
    return postings if user.is_staff else postings.filter(account__user=user)


def holds_visible_to(*, user: User) -> QuerySet[Hold]:
    holds = Hold.objects.select_related("escrow", "payer")
    return holds if user.is_staff else holds.filter(payer__user=user)


def hold_get(*, user: User, hold_id: int) -> Hold:
    try:
        return holds_visible_to(user=user).get(pk=hold_id)
    except Hold.DoesNotExist:
        raise NotFound(f"no hold {hold_id}") from None


def hold_left(*, hold: Hold) -> int:
    """What is left of a hold (its escrow balance), read fresh from the database."""
    return Account.objects.filter(pk=hold.escrow_id).values_list("balance", flat=True).get()


def hold_captured(*, hold: Hold) -> int:
    """Micro-credits captured from a hold so far (provider share and fees together)."""
    total = Posting.objects.filter(
        transaction__hold=hold, transaction__kind=Transaction.Kind.CAPTURE, account_id=hold.escrow_id
    ).aggregate(s=Sum("amount"))["s"]
    return -(total or 0)


@dataclass(frozen=True)
class HoldMoney:
    """Where a hold's credits are: the one computation of a job's held/spent/refunded that
    the API, the CLI (through the API) and the web pages all show.

    ``placed == held + spent + refunded + forfeited`` always: credits enter the escrow when
    the hold is placed (and when a clawback returns some while it is open) and leave it only
    as captures, releases and forfeits.
    """

    placed: int  # the hold's amount when placed
    held: int  # still in escrow (0 once the hold is closed)
    spent: int  # captured for providers and fees, less what audits clawed back
    refunded: int  # released to the payer's wallet, and clawbacks after the hold closed
    forfeited: int  # taken as a penalty (an audit deposit its owner lost)


def hold_money(*, holds: Iterable[Hold]) -> dict[int, HoldMoney]:
    """:class:`HoldMoney` of each hold, by hold id, in one query however many holds."""
    holds = [h for h in holds if h is not None]
    if not holds:
        return {}
    sums: dict[tuple[int, str, int], int] = {}
    for hold_id, kind, account_id, total in (
        Posting.objects.filter(
            transaction__hold_id__in=[h.pk for h in holds],
            transaction__kind__in=[
                Transaction.Kind.CAPTURE,
                Transaction.Kind.RELEASE,
                Transaction.Kind.CLAWBACK,
                Transaction.Kind.FORFEIT,
            ],
        )
        .values("transaction__hold_id", "transaction__kind", "account_id")
        .annotate(total=Sum("amount"))
        .values_list("transaction__hold_id", "transaction__kind", "account_id", "total")
    ):
        sums[(hold_id, kind, account_id)] = total or 0
    balances = dict(Account.objects.filter(pk__in=[h.escrow_id for h in holds]).values_list("pk", "balance"))
    result = {}
    for hold in holds:
        on_escrow = lambda kind, h=hold: sums.get((h.pk, kind, h.escrow_id), 0)  # noqa: E731
        on_payer = lambda kind, h=hold: sums.get((h.pk, kind, h.payer_id), 0)  # noqa: E731
        clawed_back = on_escrow(Transaction.Kind.CLAWBACK) + on_payer(Transaction.Kind.CLAWBACK)
        result[hold.pk] = HoldMoney(
            placed=hold.amount,
            held=balances[hold.escrow_id],
            spent=-on_escrow(Transaction.Kind.CAPTURE) - clawed_back,
            refunded=on_payer(Transaction.Kind.RELEASE) + on_payer(Transaction.Kind.CLAWBACK),
            forfeited=-on_escrow(Transaction.Kind.FORFEIT),
        )
    return result


@dataclass
class LedgerReport:
    """The result of :func:`ledger_verify`; ``consistent`` is the one-line answer."""

    postings_total: int
    unbalanced_transactions: list[str] = field(default_factory=list)
    balance_mismatches: dict[int, tuple[int, int]] = field(default_factory=dict)  # id: (column, postings)
    negative_accounts: list[int] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return (
            self.postings_total == 0
            and not self.unbalanced_transactions
            and not self.balance_mismatches
            and not self.negative_accounts
        )


def ledger_verify(*, accounts: QuerySet[Account] | None = None) -> LedgerReport:
    """Check the books: all postings sum to zero, every transaction is balanced, and each
    account's balance column equals the sum of its postings and is not negative (except the
    external account). ``accounts`` narrows the per-account checks (the totals are global)."""
    total = Posting.objects.aggregate(s=Sum("amount"))["s"] or 0
    unbalanced = [
        str(t)
        for t in Posting.objects.values("transaction_id")
        .annotate(s=Sum("amount"))
        .exclude(s=0)
        .values_list("transaction_id", flat=True)
    ]
    scope = Account.objects.all() if accounts is None else accounts
    mismatches = {
        pk: (balance, posted or 0)
        for pk, balance, posted in scope.annotate(posted=Sum("postings__amount")).values_list("pk", "balance", "posted")
        if balance != (posted or 0)
    }
    negative = list(scope.filter(~Q(kind=Account.Kind.EXTERNAL), balance__lt=0).values_list("pk", flat=True))
    return LedgerReport(
        postings_total=total,
        unbalanced_transactions=unbalanced,
        balance_mismatches=mismatches,
        negative_accounts=negative,
    )
