"""A separate OS process running settlement, for test_settlement_processes.py.

    python -m tests.marketplace.settle_worker ROUNDS

Connects to the database named by DATABASE_URL, prints ``ready``, waits for a line on stdin
(so that all workers start together), runs ``receipts_settle`` ROUNDS times and prints one
JSON line: what it captured, how many groups it settled, and any error.
"""

from __future__ import annotations

import json
import sys


def main(rounds: int) -> None:
    import django

    django.setup()
    from django.db import connection

    from marketplace.receipts.services import receipts_settle

    connection.ensure_connection()
    print("ready", flush=True)
    sys.stdin.readline()
    captured, groups, errors = 0, 0, []
    for _ in range(rounds):
        try:
            summary = receipts_settle(close=False)
            captured += summary.captured
            groups += summary.groups
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            errors.append(repr(e))
    connection.close()
    print(json.dumps({"captured": captured, "groups": groups, "errors": errors}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
