"""The model catalog: only models listed here (and active) may be served or requested."""

from __future__ import annotations

from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q

# Same alphabet as the swarm's DHT keys (hivemart_core.models.model_id_for).
MODEL_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
# Field validators serve the admin's forms; the services check the same patterns themselves.
_model_id_validator = RegexValidator(MODEL_ID_PATTERN, "1 to 128 characters from A-Z a-z 0-9 . _ -")
_digest_validator = RegexValidator(DIGEST_PATTERN, "a lowercase hex sha256 (64 characters)")


class CatalogModel(models.Model):
    """A decoder-only checkpoint, described as the swarm describes it (``hivemart_core.models.ModelInfo``).

    Digests are lowercase hex sha256 strings computed by ``hivemart_core.models``: the model
    digest (config essentials, every block digest, the client digest) and one digest per
    block (that block's tensors exactly as stored), which providers and clients check the
    weights they load against.
    """

    class DType(models.TextChoices):
        FLOAT32 = "float32"
        FLOAT16 = "float16"
        BFLOAT16 = "bfloat16"

    model_id = models.CharField(max_length=128, unique=True, validators=[_model_id_validator])
    name = models.CharField(max_length=200, blank=True, help_text="a human-readable name")
    arch = models.CharField(max_length=32, help_text="the Hugging Face model_type, e.g. llama")
    num_blocks = models.PositiveIntegerField()
    hidden_size = models.PositiveIntegerField()
    dtype = models.CharField(max_length=16, choices=DType.choices)
    weights_digest = models.CharField(max_length=64, validators=[_digest_validator])
    client_digest = models.CharField(
        max_length=64,
        blank=True,
        validators=[_digest_validator],
        help_text="digest of embeddings, final norm and LM head (optional)",
    )
    active = models.BooleanField(default=True, help_text="inactive models can be neither served nor requested")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_id"]
        verbose_name = "catalogued model"
        constraints = [
            models.CheckConstraint(
                condition=Q(num_blocks__gt=0) & Q(hidden_size__gt=0), name="catalog_model_positive_shape"
            ),
            models.CheckConstraint(
                condition=Q(dtype__in=["float32", "float16", "bfloat16"]), name="catalog_model_dtype_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.model_id


class BlockDigest(models.Model):
    model = models.ForeignKey(CatalogModel, on_delete=models.CASCADE, related_name="blocks")
    index = models.PositiveIntegerField()
    digest = models.CharField(max_length=64, validators=[_digest_validator])

    class Meta:
        ordering = ["model_id", "index"]
        constraints = [models.UniqueConstraint(fields=["model", "index"], name="catalog_one_digest_per_block")]

    def __str__(self) -> str:
        return f"{self.model_id} block {self.index}"
