"""``hivemart-market verify_ledger [--json]``: check the books; exit status 1 when they do not balance."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Sum

from marketplace.ledger.models import Account
from marketplace.ledger.selectors import ledger_verify


class Command(BaseCommand):
    help = (
        "Check that every transaction balances, every account's balance equals its postings and none is "
        "negative; print the totals per account kind."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, json: bool = False, **options: Any) -> None:  # noqa: A002 - Django passes --json
        report = ledger_verify()
        totals = {
            row["kind"]: row["total"]
            for row in Account.objects.values("kind").annotate(total=Sum("balance")).order_by("kind")
        }
        result = {
            "consistent": report.consistent,
            "postings_total": report.postings_total,
            "unbalanced_transactions": report.unbalanced_transactions,
            "balance_mismatches": {str(k): list(v) for k, v in report.balance_mismatches.items()},
            "negative_accounts": report.negative_accounts,
            "balances_by_kind": totals,
        }
        if json:
            self.stdout.write(_dumps(result))
        else:
            self.stdout.write(f"consistent: {report.consistent}")
            for kind, total in totals.items():
                self.stdout.write(f"  {kind:<10} {total} micro-credits")
        if not report.consistent:
            raise CommandError(f"the ledger is inconsistent: {_dumps(result)}")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
