"""A separate OS process capturing from one hold, for test_ledger_processes.py.

    python -m tests.marketplace.capture_worker HOLD PAYEE AMOUNT COUNT KEY_PREFIX

It connects to the database named by DATABASE_URL, prints ``ready``, waits for a line on
stdin (so that all workers start together), tries COUNT captures of AMOUNT and prints one
JSON line: how many succeeded, how many were refused for lack of credits, and any other error.
"""

from __future__ import annotations

import json
import sys


def main(hold_id: int, payee_id: int, amount: int, count: int, prefix: str) -> None:
    import django

    django.setup()
    from django.db import connection

    from marketplace.common.errors import InsufficientCredits
    from marketplace.ledger.models import Account, Hold
    from marketplace.ledger.services import hold_capture

    hold, payee = Hold.objects.get(pk=hold_id), Account.objects.get(pk=payee_id)
    connection.ensure_connection()
    print("ready", flush=True)
    sys.stdin.readline()
    ok, refused, other = 0, 0, []
    for i in range(count):
        try:
            hold_capture(hold=hold, amount=amount, payee=payee, idempotency_key=f"{prefix}-{i}", fee_bps=100)
            ok += 1
        except InsufficientCredits:
            refused += 1
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            other.append(repr(e))
    connection.close()
    print(json.dumps({"ok": ok, "refused": refused, "other": other}), flush=True)


if __name__ == "__main__":
    hold_arg, payee_arg, amount_arg, count_arg, prefix_arg = sys.argv[1:6]
    main(int(hold_arg), int(payee_arg), int(amount_arg), int(count_arg), prefix_arg)
