"""API: the model catalog (anyone signed in reads it; staff write it)."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.catalog.models import CatalogModel
from marketplace.catalog.selectors import catalog_model_get, catalog_models
from marketplace.catalog.services import MAX_BLOCKS, MAX_HIDDEN_SIZE, catalog_model_create, catalog_model_set_active
from marketplace.common.api import IsStaff, StrictIntegerField, parse
from marketplace.common.errors import PermissionDenied
from marketplace.common.views import APIView, ListAPIView


class CatalogModelOutput(serializers.ModelSerializer):
    block_digests = serializers.SerializerMethodField()

    class Meta:
        model = CatalogModel
        fields = [
            "model_id",
            "name",
            "arch",
            "num_blocks",
            "hidden_size",
            "dtype",
            "weights_digest",
            "client_digest",
            "block_digests",
            "active",
            "created_at",
        ]

    def get_block_digests(self, obj: CatalogModel) -> list[str]:
        return [b.digest for b in sorted(obj.blocks.all(), key=lambda b: b.index)]


class CatalogModelInput(serializers.Serializer):
    model_id = serializers.CharField(max_length=128)
    name = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    arch = serializers.CharField(max_length=32)
    num_blocks = StrictIntegerField(min_value=1, max_value=MAX_BLOCKS)
    hidden_size = StrictIntegerField(min_value=1, max_value=MAX_HIDDEN_SIZE)
    dtype = serializers.ChoiceField(choices=CatalogModel.DType.choices)
    weights_digest = serializers.CharField(max_length=64)
    client_digest = serializers.CharField(max_length=64, required=False, default="", allow_blank=True)
    block_digests = serializers.ListField(child=serializers.CharField(max_length=64), max_length=MAX_BLOCKS)


class CatalogModelPatch(serializers.Serializer):
    active = serializers.BooleanField()


class CatalogModelListCreate(ListAPIView):
    """Catalogued models. Staff may add ``?include_inactive=true`` and POST new models."""

    serializer_class = CatalogModelOutput

    def get_queryset(self) -> QuerySet[CatalogModel]:
        include = self.request.user.is_staff and self.request.query_params.get("include_inactive") == "true"
        return catalog_models(include_inactive=include)

    @extend_schema(parameters=[OpenApiParameter("include_inactive", bool, description="staff only")])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)

    @extend_schema(request=CatalogModelInput, responses={201: CatalogModelOutput})
    def post(self, request: Request) -> Response:
        if not request.user.is_staff:
            raise PermissionDenied("only staff add models to the catalog")
        model = catalog_model_create(**parse(CatalogModelInput, request.data))
        return Response(CatalogModelOutput(model).data, status=status.HTTP_201_CREATED)


class CatalogModelDetail(APIView):
    def get_permissions(self):  # noqa: ANN201
        return [IsStaff()] if self.request.method == "PATCH" else super().get_permissions()

    @extend_schema(responses=CatalogModelOutput)
    def get(self, request: Request, model_id: str) -> Response:
        model = catalog_model_get(model_id=model_id, include_inactive=request.user.is_staff)
        return Response(CatalogModelOutput(model).data)

    @extend_schema(
        request=CatalogModelPatch,
        responses=CatalogModelOutput,
        description="Staff: withdraw a model from the marketplace (active=false) or return it.",
    )
    def patch(self, request: Request, model_id: str) -> Response:
        data = parse(CatalogModelPatch, request.data)
        model = catalog_model_set_active(
            model=catalog_model_get(model_id=model_id, include_inactive=True), active=data["active"]
        )
        return Response(CatalogModelOutput(model).data)
