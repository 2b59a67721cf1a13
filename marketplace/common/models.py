"""The one table of the common app: idempotency keys and the responses they stand for."""

from __future__ import annotations

from django.db import models


class IdempotencyRecord(models.Model):
    """One ``Idempotency-Key`` sent with a POST by one user (see ``marketplace.common.idempotency``).

    ``scope`` is ``user:<id>``, as the ledger namespaces its keys, so that one user's key can
    neither collide with nor reveal another's. While ``status`` is null the request is still
    running (or died holding the key: ``locked_at`` tells how long ago it started).
    """

    scope = models.CharField(max_length=40)
    key = models.CharField(max_length=255)
    # sha256 of method, path and body: the same key with another request is refused.
    fingerprint = models.CharField(max_length=64)
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    body = models.JSONField(null=True, blank=True)
    locked_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="common_idempotency_key_per_scope")]

    def __str__(self) -> str:
        return f"{self.scope}:{self.key} ({self.status or 'running'})"
