"""Writes to the ledger: the only code that creates transactions or changes balances.

Every service runs in one database transaction and follows the same recipe (``_record``):

1. lock what decides the outcome (the hold row for hold operations), check it;
2. write the postings, then the transaction header; the database refuses the header unless
   the postings sum to zero, and refuses a reused idempotency key;
3. apply each posting to its account's balance with ``UPDATE ... SET balance = balance + d``,
   guarded by ``balance + d >= 0`` for debits (the CHECK constraint is the backstop).

Row locks are taken in one global order, so two services never wait on each other in a
cycle: the hold row first, then accounts by (kind rank, id) with escrow first and the
platform's shared fees and external accounts last. Taking the shared rows last also keeps
them locked for the shortest time, which is what lets captures from many holds run in
parallel.

Captures, the hot path, run on PostgreSQL as one call of the ``ledger_capture()`` SQL
function (migration 0003), which follows the same recipe inside the database; the ORM
implementation below serves SQLite, and a test keeps the two in step.

Idempotency: a service given a key that was already used returns the earlier result when
the request is the same (same kind, same postings) and raises ``IdempotencyConflict``
otherwise. Keys live in namespaces, so that nobody can spend a key that another owner, or
the system itself, will use: a key given with the user who sent it (``granted_by``,
``requested_by``) is stored as ``user:<id>:<key>``, every other key (those the system
derives: settlement, clawbacks, holds, charges, operator commands) as ``system:<key>``. Only
this module writes the stored form, and no request names a namespace, so a conflict can
only ever involve the same owner's own transactions.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from marketplace.accounts.models import User
from marketplace.common.errors import (
    ApplicationError,
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    ValidationFailed,
)
from marketplace.ledger.models import Account, Hold, Posting, Transaction

__all__ = [
    "MAX_AMOUNT",
    "IDEMPOTENCY_KEY_MAX",
    "wallet_get_or_create",
    "earnings_account_create",
    "platform_account",
    "credit_grant",
    "hold_place",
    "hold_capture",
    "hold_release",
    "payout",
    "clawback",
    "hold_forfeit",
    "fee_for",
    "topup_credit",
    "payout_hold_place",
    "payout_hold_pay",
    "payout_hold_release",
]

# No single movement may exceed 10^15 micro-credits (a billion credits); bounding amounts
# keeps every sum far inside a signed 64-bit column.
MAX_AMOUNT = 10**15
# The stored key, namespace included, fits the 200-character column: "user:" + a 64-bit id
# + ":" is at most 25 characters.
IDEMPOTENCY_KEY_MAX = 175
_SYSTEM_SCOPE = "system:"

_LOCK_RANK = {
    Account.Kind.ESCROW: 0,
    Account.Kind.WALLET: 1,
    Account.Kind.EARNINGS: 2,
    Account.Kind.FEES: 3,
    Account.Kind.EXTERNAL: 4,
}


def _check_amount(amount: int, field: str = "amount") -> None:
    # bool is an int subclass; True is not an amount.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ValidationFailed(f"{field} must be an integer number of micro-credits", extra={"field": field})
    if not 0 < amount <= MAX_AMOUNT:
        raise ValidationFailed(
            f"{field} must be between 1 and {MAX_AMOUNT} micro-credits", extra={"field": field, "value": amount}
        )


def _check_key(key: str | None) -> None:
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= IDEMPOTENCY_KEY_MAX):
        raise ValidationFailed(
            f"an idempotency key is a string of 1 to {IDEMPOTENCY_KEY_MAX} characters",
            extra={"field": "idempotency_key"},
        )


def _scoped_key(key: str | None, owner: User | None) -> str | None:
    """The stored form of ``key``: in ``owner``'s namespace when a user sent it, else the system's."""
    _check_key(key)
    if key is None:
        return None
    return f"user:{owner.pk}:{key}" if owner is not None else f"{_SYSTEM_SCOPE}{key}"


def _check_kind(account: Account, *kinds: Account.Kind, role: str) -> None:
    if account.kind not in kinds:
        raise ValidationFailed(
            f"the {role} must be a {' or '.join(kinds)} account, not {account.kind}", extra={"account": account.pk}
        )


def fee_for(amount: int, fee_bps: int) -> int:
    """The platform's fee on ``amount``: ``fee_bps`` basis points, rounded down (in the provider's favour)."""
    return amount * fee_bps // 10_000


def _existing(key: str | None, kind: str, entries: dict[int, int]) -> Transaction | None:
    """The transaction recorded earlier under the stored ``key``, if it asked for the same
    movement. A conflict names the earlier transaction: the namespace makes it the caller's own."""
    if key is None:
        return None
    previous = Transaction.objects.filter(idempotency_key=key).first()
    if previous is None:
        return None
    recorded = dict(previous.postings.values_list("account_id", "amount"))
    if previous.kind != kind or recorded != entries:
        raise _conflict(key, previous.pk)
    return previous


def _conflict(key: str, transaction_id: object | None = None) -> IdempotencyConflict:
    extra: dict[str, object] = {"idempotency_key": Transaction.key_as_sent(key)}
    if transaction_id is not None:
        extra["transaction"] = str(transaction_id)
    return IdempotencyConflict("this idempotency key was used for a different ledger movement", extra=extra)


def _record(
    *,
    kind: str,
    entries: Iterable[tuple[Account, int]],
    idempotency_key: str | None = None,
    hold: Hold | None = None,
    memo: str = "",
    created_by: User | None = None,
) -> Transaction:
    """Write one balanced transaction and apply it to the balances. Call inside ``transaction.atomic``."""
    deltas: dict[int, int] = defaultdict(int)
    accounts: dict[int, Account] = {}
    for account, amount in entries:
        deltas[account.pk] += amount
        accounts[account.pk] = account
    deltas = {pk: d for pk, d in deltas.items() if d != 0}
    if len(deltas) < 2 or sum(deltas.values()) != 0:
        # A programming error in a service, not bad input: the database would refuse it too.
        raise ApplicationError(f"unbalanced {kind} transaction {deltas}", code="ledger_unbalanced")

    tx_id = uuid.uuid4()
    Posting.objects.bulk_create(
        [Posting(transaction_id=tx_id, account_id=pk, amount=d) for pk, d in sorted(deltas.items())]
    )
    try:
        with transaction.atomic():
            tx = Transaction.objects.create(
                id=tx_id, kind=kind, idempotency_key=idempotency_key, hold=hold, memo=memo[:200], created_by=created_by
            )
    except IntegrityError:
        # Another request recorded this idempotency key after our check; it has committed
        # (the unique index made us wait for it), so the caller can ask again and get it.
        if idempotency_key is not None and Transaction.objects.filter(idempotency_key=idempotency_key).exists():
            raise Conflict(
                "a concurrent request with this idempotency key won; retry to get its result",
                extra={"idempotency_key": Transaction.key_as_sent(idempotency_key)},
            ) from None
        raise

    for pk in sorted(deltas, key=lambda pk: (_LOCK_RANK[accounts[pk].kind], pk)):
        delta, account = deltas[pk], accounts[pk]
        rows = Account.objects.filter(pk=pk)
        if delta < 0 and account.kind != Account.Kind.EXTERNAL:
            rows = rows.filter(balance__gte=-delta)
        if rows.update(balance=F("balance") + delta) != 1:
            balance = Account.objects.filter(pk=pk).values_list("balance", flat=True).first()
            raise InsufficientCredits(
                f"account #{pk} holds {balance} micro-credits, {-delta} needed",
                extra={"account": pk, "balance": balance, "needed": -delta},
            )
    return tx


# --- accounts -----------------------------------------------------------------------------


def wallet_get_or_create(*, user: User) -> Account:
    """The user's wallet, created on first use."""
    wallet, _ = Account.objects.get_or_create(
        kind=Account.Kind.WALLET, user=user, defaults={"label": f"wallet of {user.username}"}
    )
    return wallet


def earnings_account_create(*, user: User, label: str) -> Account:
    """A new earnings account owned by ``user`` (one per provider)."""
    return Account.objects.create(kind=Account.Kind.EARNINGS, user=user, label=label[:200])


def platform_account(kind: Account.Kind) -> Account:
    """The platform's singleton ``fees`` or ``external`` account, created on first use."""
    if kind not in (Account.Kind.FEES, Account.Kind.EXTERNAL):
        raise ValueError(f"{kind} is not a platform account kind")
    account, _ = Account.objects.get_or_create(kind=kind, user=None, defaults={"label": f"platform {kind}"})
    return account


# --- movements ----------------------------------------------------------------------------


@transaction.atomic
def credit_grant(
    *, account: Account, amount: int, granted_by: User | None = None, memo: str = "", idempotency_key: str | None = None
) -> Transaction:
    """Staff top-up: credits from the external account into a wallet. ``idempotency_key`` is
    ``granted_by``'s own (the system's when nobody is named: operator commands)."""
    _check_amount(amount)
    idempotency_key = _scoped_key(idempotency_key, granted_by)
    _check_kind(account, Account.Kind.WALLET, role="grant's recipient")
    external = platform_account(Account.Kind.EXTERNAL)
    entries = {external.pk: -amount, account.pk: amount}
    if (previous := _existing(idempotency_key, Transaction.Kind.GRANT, entries)) is not None:
        return previous
    return _record(
        kind=Transaction.Kind.GRANT,
        entries=[(external, -amount), (account, amount)],
        idempotency_key=idempotency_key,
        memo=memo or "credit grant",
        created_by=granted_by,
    )


@transaction.atomic
def hold_place(*, account: Account, amount: int, memo: str = "", idempotency_key: str | None = None) -> Hold:
    """Set ``amount`` aside from a wallet into a new hold (InsufficientCredits if the wallet lacks it).
    ``idempotency_key`` is a system key (holds are placed by services, never keyed by a request)."""
    _check_amount(amount)
    idempotency_key = _scoped_key(idempotency_key, None)
    _check_kind(account, Account.Kind.WALLET, role="hold's payer")
    if idempotency_key is not None:
        previous = Transaction.objects.filter(idempotency_key=idempotency_key).select_related("hold").first()
        if previous is not None:
            if (
                previous.kind != Transaction.Kind.HOLD
                or previous.hold.payer_id != account.pk
                or previous.hold.amount != amount
            ):
                raise _conflict(idempotency_key)
            return previous.hold
    escrow = Account.objects.create(kind=Account.Kind.ESCROW, user_id=account.user_id, label=memo[:200])
    hold = Hold.objects.create(payer=account, escrow=escrow, amount=amount, memo=memo[:200])
    _record(
        kind=Transaction.Kind.HOLD,
        entries=[(account, -amount), (escrow, amount)],
        idempotency_key=idempotency_key,
        hold=hold,
        memo=memo or "hold placed",
    )
    escrow.balance = amount
    return hold


def _lock_hold(hold_id: int) -> Hold:
    """Re-read a hold under a row lock: every operation on a hold holds this lock, so what is
    left in its escrow cannot change until the caller commits."""
    try:
        return Hold.objects.select_for_update(of=("self",)).select_related("escrow", "payer").get(pk=hold_id)
    except Hold.DoesNotExist:
        raise NotFound(f"no hold {hold_id}") from None


def hold_capture(
    *,
    hold: Hold,
    amount: int,
    payee: Account,
    idempotency_key: str,
    fee_bps: int | None = None,
    fee: int | None = None,
    memo: str = "",
) -> Transaction:
    """Pay ``amount`` out of an open hold: ``amount - fee`` to ``payee`` (a provider's earnings
    account), the fee to the platform. Partial captures are normal; a capture larger than what
    is left of the hold raises InsufficientCredits, one from a closed hold Conflict
    (``hold_closed``). Idempotent by ``idempotency_key`` (required: a capture is what a
    retried settlement must not repeat), a system key: no request can spend it first. The fee
    is ``fee_for(amount, fee_bps)`` unless ``fee`` gives it (settlement does: its fees are
    computed on cumulative amounts).

    On PostgreSQL this runs as one call of the ``ledger_capture()`` function (migrations 0003, 0005),
    elsewhere through the ORM; both do the same thing under the same locks.
    """
    _check_amount(amount)
    if idempotency_key is None:
        raise ValidationFailed("a capture needs an idempotency key", extra={"field": "idempotency_key"})
    idempotency_key = _scoped_key(idempotency_key, None)
    _check_kind(payee, Account.Kind.EARNINGS, role="capture's payee")
    fee_bps = settings.HIVEMART_PLATFORM_FEE_BPS if fee_bps is None else fee_bps
    if not isinstance(fee_bps, int) or isinstance(fee_bps, bool) or not 0 <= fee_bps <= 10_000:
        raise ValidationFailed("fee_bps is an integer between 0 and 10000", extra={"field": "fee_bps"})
    if fee is None:
        fee = fee_for(amount, fee_bps)
    elif not isinstance(fee, int) or isinstance(fee, bool) or not 0 <= fee <= amount:
        raise ValidationFailed("fee is an integer between 0 and the amount", extra={"field": "fee"})
    memo = (memo or f"capture from hold #{hold.pk}")[:200]
    capture = _hold_capture_postgres if connection.vendor == "postgresql" else _hold_capture_orm
    return capture(hold_id=hold.pk, amount=amount, payee=payee, fee=fee, key=idempotency_key, memo=memo)


@transaction.atomic
def _hold_capture_orm(*, hold_id: int, amount: int, payee: Account, fee: int, key: str, memo: str) -> Transaction:
    hold = _lock_hold(hold_id)
    entries: list[tuple[Account, int]] = [(hold.escrow, -amount), (payee, amount - fee)]
    if fee:
        entries.append((platform_account(Account.Kind.FEES), fee))
    wanted: dict[int, int] = defaultdict(int)
    for account, delta in entries:
        wanted[account.pk] += delta
    if (previous := _existing(key, Transaction.Kind.CAPTURE, {pk: d for pk, d in wanted.items() if d})) is not None:
        return previous
    if hold.state != Hold.State.OPEN:
        raise _hold_closed(hold_id)
    left = Account.objects.filter(pk=hold.escrow_id).values_list("balance", flat=True).get()
    if amount > left:
        raise _hold_insufficient(hold_id, left, amount)
    return _record(kind=Transaction.Kind.CAPTURE, entries=entries, idempotency_key=key, hold=hold, memo=memo)


_CAPTURE_COLUMNS = ["id", "kind", "idempotency_key", "hold_id", "memo", "created_by_id", "created_at"]


def _hold_capture_postgres(*, hold_id: int, amount: int, payee: Account, fee: int, key: str, memo: str) -> Transaction:
    def call() -> tuple:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT transaction_id, created_at, replayed FROM ledger_capture(%s, %s, %s, %s, %s, %s)",
                [hold_id, amount, payee.pk, fee, key, memo],
            )
            return cursor.fetchone()

    try:
        # Outside a transaction the call is one atomic statement, one round trip. Inside the
        # caller's transaction it runs under a savepoint, so that a refusal (which aborts the
        # statement) leaves the caller's transaction usable.
        if connection.in_atomic_block:
            with transaction.atomic():
                tx_id, created_at, replayed = call()
        else:
            tx_id, created_at, replayed = call()
    except DatabaseError as e:
        cause = e.__cause__
        state = getattr(cause, "sqlstate", None)
        detail = getattr(getattr(cause, "diag", None), "message_detail", None)
        if state == "HM001":
            raise _hold_insufficient(hold_id, int(detail), amount) from None
        if state == "HM002":
            raise _hold_closed(hold_id) from None
        if state == "HM003":
            raise _conflict(key, detail) from None
        if state == "HM004":
            raise NotFound(f"no hold {hold_id}") from None
        if state == "23505":  # unique_violation: the same key, concurrently, on another hold
            raise Conflict(
                "a concurrent request with this idempotency key won; retry to get its result",
                extra={"idempotency_key": Transaction.key_as_sent(key)},
            ) from None
        raise
    if replayed:
        return Transaction.objects.get(pk=tx_id)
    return Transaction.from_db(
        connection.alias, _CAPTURE_COLUMNS, [tx_id, Transaction.Kind.CAPTURE, key, hold_id, memo, None, created_at]
    )


def _hold_closed(hold_id: int) -> Conflict:
    return Conflict(f"hold #{hold_id} is closed", extra={"hold": hold_id}, code="hold_closed")


def _hold_insufficient(hold_id: int, left: int, asked: int) -> InsufficientCredits:
    return InsufficientCredits(
        f"hold #{hold_id} has {left} micro-credits left, {asked} asked",
        extra={"hold": hold_id, "left": left, "asked": asked},
    )


@transaction.atomic
def hold_release(*, hold: Hold, memo: str = "") -> Transaction | None:
    """Close a hold, returning what is left of it to the payer's wallet.

    Returns the release transaction, or None when there was nothing to move (the hold was
    captured in full, or is already closed: releasing twice is harmless).
    """
    hold = _lock_hold(hold.pk)
    if hold.state == Hold.State.CLOSED:
        return None
    left = Account.objects.filter(pk=hold.escrow_id).values_list("balance", flat=True).get()
    tx = None
    if left > 0:
        tx = _record(
            kind=Transaction.Kind.RELEASE,
            entries=[(hold.escrow, -left), (hold.payer, left)],
            hold=hold,
            memo=memo or f"release of hold #{hold.pk}",
        )
    hold.state, hold.closed_at = Hold.State.CLOSED, timezone.now()
    hold.save(update_fields=["state", "closed_at"])
    return tx


@transaction.atomic
def payout(
    *,
    account: Account,
    amount: int,
    idempotency_key: str | None = None,
    requested_by: User | None = None,
    memo: str = "",
) -> Transaction:
    """Pay credits out of the platform: from a provider's earnings account to the external account.
    ``idempotency_key`` is ``requested_by``'s own: no user's key can block another user's
    payout, nor any movement the system makes."""
    _check_amount(amount)
    idempotency_key = _scoped_key(idempotency_key, requested_by)
    _check_kind(account, Account.Kind.EARNINGS, role="payout's source")
    external = platform_account(Account.Kind.EXTERNAL)
    if (
        previous := _existing(idempotency_key, Transaction.Kind.PAYOUT, {account.pk: -amount, external.pk: amount})
    ) is not None:
        return previous
    return _record(
        kind=Transaction.Kind.PAYOUT,
        entries=[(account, -amount), (external, amount)],
        idempotency_key=idempotency_key,
        memo=memo or "payout",
        created_by=requested_by,
    )


@transaction.atomic
def clawback(
    *, source: Account, hold: Hold, amount: int, fee_refund: int = 0, idempotency_key: str, memo: str = ""
) -> tuple[Transaction | None, int]:
    """Take back credits paid out of ``hold`` (work an audit found to be fake): up to ``amount``
    from ``source`` (a provider's earnings account), as far as its balance allows, plus the
    platform fee charged on it (``fee_refund``, scaled down in proportion when the earnings
    fall short). The credits return to the hold's escrow while it is open, else to the payer's
    wallet. Returns the transaction (None when there was nothing to take) and the amount taken
    from ``source``. Idempotent by ``idempotency_key`` (a system key).
    """
    _check_amount(amount)
    idempotency_key = _scoped_key(idempotency_key, None)
    _check_kind(source, Account.Kind.EARNINGS, role="clawback's source")
    if not isinstance(fee_refund, int) or isinstance(fee_refund, bool) or not 0 <= fee_refund <= MAX_AMOUNT:
        raise ValidationFailed("fee_refund is a non-negative integer", extra={"field": "fee_refund"})
    previous = Transaction.objects.filter(idempotency_key=idempotency_key).first()
    if previous is not None:
        if previous.kind != Transaction.Kind.CLAWBACK or previous.hold_id != hold.pk:
            raise _conflict(idempotency_key)
        taken = -(previous.postings.filter(account=source).values_list("amount", flat=True).first() or 0)
        return previous, taken
    hold = _lock_hold(hold.pk)
    fees = platform_account(Account.Kind.FEES)
    target = hold.escrow if hold.state == Hold.State.OPEN else hold.payer
    # Lock in the global order (target escrow or wallet, then earnings, then fees), so that
    # the balances read here hold still and no capture can wait on us in a cycle.
    balances = {
        pk: Account.objects.select_for_update().filter(pk=pk).values_list("balance", flat=True).get()
        for pk in (target.pk, source.pk, fees.pk)
    }
    taken = min(amount, balances[source.pk])
    refund = min(fee_refund * taken // amount, balances[fees.pk])
    if taken + refund == 0:
        return None, 0
    entries: list[tuple[Account, int]] = [(target, taken + refund)]
    if taken:
        entries.append((source, -taken))
    if refund:
        entries.append((fees, -refund))
    tx = _record(
        kind=Transaction.Kind.CLAWBACK,
        entries=entries,
        idempotency_key=idempotency_key,
        hold=hold,
        memo=memo or f"clawback to hold #{hold.pk}",
    )
    return tx, taken


@transaction.atomic
def hold_forfeit(*, hold: Hold, memo: str = "") -> Transaction | None:
    """Close a hold, moving what is left of it to the platform's fees account instead of back to
    the payer: a deposit (an audit's) that its owner lost. Returns the transaction, or None when
    nothing was left or the hold was already closed (forfeiting twice takes nothing)."""
    hold = _lock_hold(hold.pk)
    if hold.state == Hold.State.CLOSED:
        return None
    left = Account.objects.filter(pk=hold.escrow_id).values_list("balance", flat=True).get()
    tx = None
    if left > 0:
        tx = _record(
            kind=Transaction.Kind.FORFEIT,
            entries=[(hold.escrow, -left), (platform_account(Account.Kind.FEES), left)],
            hold=hold,
            memo=memo or f"hold #{hold.pk} forfeited",
        )
    hold.state, hold.closed_at = Hold.State.CLOSED, timezone.now()
    hold.save(update_fields=["state", "closed_at"])
    return tx


# --- money in and out (marketplace.payments) ------------------------------------------------


@transaction.atomic
def topup_credit(*, account: Account, amount: int, idempotency_key: str, memo: str = "") -> Transaction:
    """A paid top-up: credits from the external account into a wallet. ``idempotency_key`` is a
    system key derived from the payment (one per checkout session), so that a payment that is
    reported twice credits once."""
    _check_amount(amount)
    if idempotency_key is None:
        raise ValidationFailed("a top-up needs an idempotency key", extra={"field": "idempotency_key"})
    key = _scoped_key(idempotency_key, None)
    _check_kind(account, Account.Kind.WALLET, role="top-up's recipient")
    external = platform_account(Account.Kind.EXTERNAL)
    if (previous := _existing(key, Transaction.Kind.TOPUP, {external.pk: -amount, account.pk: amount})) is not None:
        return previous
    return _record(
        kind=Transaction.Kind.TOPUP,
        entries=[(external, -amount), (account, amount)],
        idempotency_key=key,
        memo=memo or "top-up",
    )


@transaction.atomic
def payout_hold_place(
    *, source: Account, amount: int, idempotency_key: str, requested_by: User, memo: str = ""
) -> tuple[Account, Transaction]:
    """Set ``amount`` aside from an earnings account into a new escrow account of its own, for a
    payout request that staff have yet to decide: what is held cannot be paid out twice nor
    taken back by a clawback. InsufficientCredits when the earnings lack it (the guarded
    debit decides, so two concurrent requests cannot both take the same credits)."""
    _check_amount(amount)
    if idempotency_key is None:
        raise ValidationFailed("a payout hold needs an idempotency key", extra={"field": "idempotency_key"})
    _check_kind(source, Account.Kind.EARNINGS, role="payout's source")
    key = _scoped_key(idempotency_key, None)
    previous = Transaction.objects.filter(idempotency_key=key).first()
    if previous is not None:
        postings = dict(previous.postings.values_list("account_id", "amount"))
        if previous.kind != Transaction.Kind.PAYOUT_HOLD or postings.get(source.pk) != -amount:
            raise _conflict(key, previous.pk)
        escrow_id = next(pk for pk, d in postings.items() if pk != source.pk)
        return Account.objects.get(pk=escrow_id), previous
    escrow = Account.objects.create(kind=Account.Kind.ESCROW, user=requested_by, label=(memo or "payout hold")[:200])
    tx = _record(
        kind=Transaction.Kind.PAYOUT_HOLD,
        entries=[(source, -amount), (escrow, amount)],
        idempotency_key=key,
        memo=memo or "payout requested",
        created_by=requested_by,
    )
    escrow.balance = amount
    return escrow, tx


def _escrow_locked(escrow: Account) -> int:
    """Lock a payout hold's escrow account and return its balance (the lock orders deciders)."""
    return Account.objects.select_for_update().filter(pk=escrow.pk).values_list("balance", flat=True).get()


@transaction.atomic
def payout_hold_pay(*, escrow: Account, idempotency_key: str, decided_by: User | None, memo: str = "") -> Transaction:
    """Pay a payout hold out of the platform: all of its escrow to the external account.
    Idempotent by ``idempotency_key`` (a system key); paying an emptied hold again is a Conflict."""
    _check_kind(escrow, Account.Kind.ESCROW, role="payout hold")
    key = _scoped_key(idempotency_key, None)
    left = _escrow_locked(escrow)
    previous = Transaction.objects.filter(idempotency_key=key).first()
    if previous is not None:
        if previous.kind != Transaction.Kind.PAYOUT or not previous.postings.filter(account=escrow).exists():
            raise _conflict(key, previous.pk)
        return previous
    if left <= 0:
        raise Conflict(f"payout hold #{escrow.pk} holds nothing", extra={"account": escrow.pk}, code="hold_closed")
    return _record(
        kind=Transaction.Kind.PAYOUT,
        entries=[(escrow, -left), (platform_account(Account.Kind.EXTERNAL), left)],
        idempotency_key=key,
        memo=memo or "payout",
        created_by=decided_by,
    )


@transaction.atomic
def payout_hold_release(
    *, escrow: Account, to: Account, idempotency_key: str, decided_by: User | None, memo: str = ""
) -> Transaction:
    """Return a payout hold to the earnings account it came from (a rejected request).
    Idempotent by ``idempotency_key`` (a system key); releasing an emptied hold is a Conflict."""
    _check_kind(escrow, Account.Kind.ESCROW, role="payout hold")
    _check_kind(to, Account.Kind.EARNINGS, role="release's recipient")
    key = _scoped_key(idempotency_key, None)
    left = _escrow_locked(escrow)
    previous = Transaction.objects.filter(idempotency_key=key).first()
    if previous is not None:
        if previous.kind != Transaction.Kind.PAYOUT_RELEASE or not previous.postings.filter(account=escrow).exists():
            raise _conflict(key, previous.pk)
        return previous
    if left <= 0:
        raise Conflict(f"payout hold #{escrow.pk} holds nothing", extra={"account": escrow.pk}, code="hold_closed")
    return _record(
        kind=Transaction.Kind.PAYOUT_RELEASE,
        entries=[(escrow, -left), (to, left)],
        idempotency_key=key,
        memo=memo or "payout rejected: credits returned",
        created_by=decided_by,
    )
