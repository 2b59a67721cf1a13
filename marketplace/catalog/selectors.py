"""Reads from the model catalog."""

from __future__ import annotations

from django.db.models import QuerySet

from marketplace.catalog.models import CatalogModel
from marketplace.common.errors import NotFound, ValidationFailed


def catalog_models(*, include_inactive: bool = False) -> QuerySet[CatalogModel]:
    models = CatalogModel.objects.prefetch_related("blocks")
    return models if include_inactive else models.filter(active=True)


def catalog_model_get(*, model_id: str, include_inactive: bool = False) -> CatalogModel:
    """The catalogued model ``model_id``; NotFound when it is not catalogued (or inactive)."""
    try:
        return catalog_models(include_inactive=include_inactive).get(model_id=model_id)
    except CatalogModel.DoesNotExist:
        raise NotFound(f"no catalogued model {model_id!r}", extra={"model_id": model_id}) from None


def catalog_model_for_use(*, model_id: str) -> CatalogModel:
    """The model to serve or request: it must be catalogued and active (ValidationFailed otherwise,
    since the caller named it in a request body)."""
    model = CatalogModel.objects.filter(model_id=model_id).first()
    if model is None:
        raise ValidationFailed(
            f"{model_id!r} is not a catalogued model", extra={"field": "model", "model_id": model_id}
        )
    if not model.active:
        raise ValidationFailed(
            f"{model_id} is withdrawn from the catalog", extra={"field": "model", "model_id": model_id}
        )
    return model
