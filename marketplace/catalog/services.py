"""Writes to the model catalog (staff only, through the API or the admin)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from django.db import IntegrityError, transaction

from marketplace.catalog.models import DIGEST_PATTERN, MODEL_ID_PATTERN, BlockDigest, CatalogModel
from marketplace.common.errors import Conflict, ValidationFailed

MAX_BLOCKS = 4096
MAX_HIDDEN_SIZE = 1 << 20
_ARCH_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)
_DIGEST_RE = re.compile(DIGEST_PATTERN)


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, extra={"field": field})


@transaction.atomic
def catalog_model_create(
    *,
    model_id: str,
    arch: str,
    num_blocks: int,
    hidden_size: int,
    dtype: str,
    weights_digest: str,
    block_digests: Sequence[str],
    client_digest: str = "",
    name: str = "",
) -> CatalogModel:
    """Add a model to the catalog with one digest per block (in block order)."""
    if not isinstance(model_id, str) or not _MODEL_ID_RE.match(model_id):
        raise _invalid("model_id", "a model id has 1 to 128 characters from A-Z a-z 0-9 . _ -")
    if not isinstance(arch, str) or not _ARCH_RE.match(arch):
        raise _invalid("arch", "an architecture is a lowercase model_type such as llama")
    for field, value, top in (("num_blocks", num_blocks, MAX_BLOCKS), ("hidden_size", hidden_size, MAX_HIDDEN_SIZE)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= top:
            raise _invalid(field, f"{field} is an integer between 1 and {top}")
    if dtype not in CatalogModel.DType.values:
        raise _invalid("dtype", f"dtype is one of {', '.join(CatalogModel.DType.values)}")
    for field, digest in (("weights_digest", weights_digest), ("client_digest", client_digest or "0" * 64)):
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise _invalid(field, "a digest is a lowercase hex sha256 (64 characters)")
    if len(block_digests) != num_blocks:
        raise _invalid("block_digests", f"expected {num_blocks} block digests, got {len(block_digests)}")
    for i, digest in enumerate(block_digests):
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise ValidationFailed(
                "a digest is a lowercase hex sha256 (64 characters)", extra={"field": "block_digests", "index": i}
            )
    if len(name) > 200:
        raise _invalid("name", "a name has at most 200 characters")
    try:
        with transaction.atomic():
            model = CatalogModel.objects.create(
                model_id=model_id,
                name=name,
                arch=arch,
                num_blocks=num_blocks,
                hidden_size=hidden_size,
                dtype=dtype,
                weights_digest=weights_digest,
                client_digest=client_digest,
            )
    except IntegrityError:
        raise Conflict(f"the model {model_id} is already catalogued", extra={"model_id": model_id}) from None
    BlockDigest.objects.bulk_create(BlockDigest(model=model, index=i, digest=d) for i, d in enumerate(block_digests))
    return model


def catalog_model_set_active(*, model: CatalogModel, active: bool) -> CatalogModel:
    """Withdraw a model from (or return it to) the marketplace; running jobs are not touched."""
    if model.active != active:
        model.active = active
        model.save(update_fields=["active"])
    return model
