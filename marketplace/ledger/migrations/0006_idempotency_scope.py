"""Idempotency keys move into namespaces (see ``ledger.services``): a key recorded with the
user who sent it (grants and payouts made through the API) becomes ``user:<id>:<key>``, every
other key (settlement, clawbacks, holds, operator commands) ``system:<key>``, so that a
retried system movement still finds what it recorded before this migration.

A legacy key too long for its namespace cannot be sent again (the services now refuse keys
over 175 characters), so it keeps only a digest: unique, never matched by a new request.
"""

from __future__ import annotations

import hashlib

from django.db import migrations

_COLUMN = 200
_USER_KINDS = ("grant", "payout")


def _scoped(key: str, kind: str, created_by_id: int | None) -> str:
    prefix = f"user:{created_by_id}:" if kind in _USER_KINDS and created_by_id is not None else "system:"
    if len(prefix) + len(key) <= _COLUMN:
        return prefix + key
    return f"{prefix}legacy:{hashlib.sha256(key.encode()).hexdigest()}"


def forwards(apps, schema_editor) -> None:  # noqa: ANN001 - Django's migration signature
    Transaction = apps.get_model("ledger", "Transaction")
    rows = (Transaction.objects.exclude(idempotency_key__isnull=True)
            .exclude(idempotency_key__startswith="system:").exclude(idempotency_key__startswith="user:")
            .values_list("pk", "idempotency_key", "kind", "created_by_id"))
    for pk, key, kind, created_by_id in rows.iterator():
        Transaction.objects.filter(pk=pk).update(idempotency_key=_scoped(key, kind, created_by_id))


class Migration(migrations.Migration):

    dependencies = [
        ("ledger", "0005_capture_explicit_fee"),
    ]

    # Going back leaves the keys namespaced: stripping them could make two owners' keys equal.
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
