from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A marketplace user. The same user may buy compute (jobs), sell it (providers), or both."""


class ApiKey(models.Model):
    """An API key: ``hm_<prefix>_<secret>``. Only the prefix (to find the row and to show the
    user which key is which) and the sha256 of the whole key are stored; the key itself is
    shown once, when created. The secret carries 256 random bits, so a plain sha256 cannot
    be brute-forced and a slow password hash would only slow down every request."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
