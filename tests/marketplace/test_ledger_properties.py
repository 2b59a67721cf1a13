"""Ledger invariants under random sequences of grants, holds, captures, releases and payouts.

Each example runs the real services against the database and a tiny Python model of the
expected balances; afterwards the postings must sum to zero, every balance column must equal
its postings, nothing but the external account may be negative, and the balances must be
the model's.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.django import TestCase

from marketplace.accounts.services import user_create
from marketplace.common.errors import Conflict, InsufficientCredits
from marketplace.ledger.models import Account, Hold
from marketplace.ledger.selectors import ledger_verify
from marketplace.ledger.services import (
    credit_grant,
    earnings_account_create,
    fee_for,
    hold_capture,
    hold_place,
    hold_release,
    payout,
    platform_account,
    wallet_get_or_create,
)

USERS, PROVIDERS = 3, 2
amounts = st.integers(min_value=1, max_value=2_000)

operations = st.one_of(
    st.tuples(st.just("grant"), st.integers(0, USERS - 1), amounts),
    st.tuples(st.just("hold"), st.integers(0, USERS - 1), amounts),
    st.tuples(
        st.just("capture"),
        st.integers(0, 7),
        st.integers(0, PROVIDERS - 1),
        amounts,
        st.sampled_from([0, 1, 250, 10_000]),
    ),
    st.tuples(st.just("recapture"), st.integers(0, 7), st.integers(0, 20)),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("payout"), st.integers(0, PROVIDERS - 1), amounts),
)


class LedgerInvariants(TestCase):
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(operations, min_size=1, max_size=25))
    def test_books_always_balance(self, ops: list[tuple]) -> None:
        wallets = [wallet_get_or_create(user=user_create(username=f"client{i}")) for i in range(USERS)]
        earnings = [
            earnings_account_create(user=user_create(username=f"provider{i}"), label="p") for i in range(PROVIDERS)
        ]
        expected: dict[int, int] = {a.pk: 0 for a in wallets + earnings}
        fees = external = 0
        holds: list[Hold] = []
        left: dict[int, int] = {}
        captures: list[tuple[Hold, Account, int, int, str]] = []  # for replays of an earlier key

        for n, op in enumerate(ops):
            kind = op[0]
            if kind == "grant":
                _, i, amount = op
                credit_grant(account=wallets[i], amount=amount)
                expected[wallets[i].pk] += amount
                external -= amount
            elif kind == "hold":
                _, i, amount = op
                if amount > expected[wallets[i].pk]:
                    with self.assertRaises(InsufficientCredits):
                        hold_place(account=wallets[i], amount=amount)
                else:
                    hold = hold_place(account=wallets[i], amount=amount)
                    holds.append(hold)
                    left[hold.pk] = amount
                    expected[wallets[i].pk] -= amount
            elif kind == "capture" and holds:
                _, h, p, amount, bps = op
                hold = holds[h % len(holds)]
                key = f"capture-{n}"
                if hold.pk not in left:
                    with self.assertRaises(Conflict):
                        hold_capture(hold=hold, amount=amount, payee=earnings[p], idempotency_key=key, fee_bps=bps)
                elif amount > left[hold.pk]:
                    with self.assertRaises(InsufficientCredits):
                        hold_capture(hold=hold, amount=amount, payee=earnings[p], idempotency_key=key, fee_bps=bps)
                else:
                    hold_capture(hold=hold, amount=amount, payee=earnings[p], idempotency_key=key, fee_bps=bps)
                    captures.append((hold, earnings[p], amount, bps, key))
                    left[hold.pk] -= amount
                    fee = fee_for(amount, bps)
                    expected[earnings[p].pk] += amount - fee
                    fees += fee
            elif kind == "recapture" and captures:
                # A retried settlement: the same key again must not move anything.
                _, c, _ = op
                hold, payee, amount, bps, key = captures[c % len(captures)]
                hold_capture(hold=hold, amount=amount, payee=payee, idempotency_key=key, fee_bps=bps)
            elif kind == "release" and holds:
                hold = holds[op[1] % len(holds)]
                hold_release(hold=hold)
                if hold.pk in left:
                    expected[hold.payer_id] += left.pop(hold.pk)
            elif kind == "payout":
                _, p, amount = op
                if amount > expected[earnings[p].pk]:
                    with self.assertRaises(InsufficientCredits):
                        payout(account=earnings[p], amount=amount)
                else:
                    payout(account=earnings[p], amount=amount)
                    expected[earnings[p].pk] -= amount
                    external += amount

        report = ledger_verify()
        self.assertTrue(report.consistent, report)
        balances = dict(Account.objects.values_list("pk", "balance"))
        for pk, value in expected.items():
            self.assertEqual(balances[pk], value)
        for hold in holds:
            self.assertEqual(balances[hold.escrow_id], left.get(hold.pk, 0))
        self.assertEqual(Account.objects.get(pk=platform_account(Account.Kind.FEES).pk).balance, fees)
        self.assertEqual(Account.objects.get(pk=platform_account(Account.Kind.EXTERNAL).pk).balance, external)
        self.assertEqual(sum(balances.values()), 0)
