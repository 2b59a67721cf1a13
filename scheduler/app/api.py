"""API: replanning a job around a failed provider, and where a joining provider is needed."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.catalog.selectors import catalog_model_for_use
from marketplace.common.api import StrictIntegerField, parse
from marketplace.common.views import APIView
from marketplace.jobs.api import PlanOutput
from marketplace.jobs.selectors import job_get
from scheduler.services.placement import placement_suggest
from scheduler.services.replanning import job_replan


class ReplanInput(serializers.Serializer):
    provider = StrictIntegerField(min_value=1, help_text="id of the provider that failed (a primary of the plan)")


class ReplanOutput(serializers.Serializer):
    plan = PlanOutput()
    replaced = serializers.ListField(
        child=serializers.IntegerField(), help_text="indices of the new segments; empty when already replaced"
    )


class JobReplan(APIView):
    @extend_schema(
        request=ReplanInput,
        responses=ReplanOutput,
        description="Report a failed provider; the answer is the new plan with replacement segments "
        "within the job's max_price (409 `no_plan` when nobody else serves its blocks).",
    )
    def post(self, request: Request, job_id: int) -> Response:
        data = parse(ReplanInput, request.data)
        result = job_replan(
            job=job_get(user=request.user, job_id=job_id), by=request.user, failed_provider_id=data["provider"]
        )
        return Response(ReplanOutput({"plan": result.plan, "replaced": list(result.replaced)}).data)


class PlacementInput(serializers.Serializer):
    model = serializers.CharField(max_length=128)
    # Query parameters are strings: DRF's IntegerField parses them (and refuses "1.5", "x").
    blocks = serializers.IntegerField(min_value=1, max_value=4096, help_text="how many blocks the provider can hold")


class PlacementOutput(serializers.Serializer):
    model = serializers.CharField()
    block_start = serializers.IntegerField()
    block_end = serializers.IntegerField()


class Placement(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("model", str, required=True), OpenApiParameter("blocks", int, required=True)],
        responses=PlacementOutput,
        description="The span a joining provider should serve: the one raising the weakest block's "
        "measured throughput.",
    )
    def get(self, request: Request) -> Response:
        data = parse(PlacementInput, request.query_params)
        model = catalog_model_for_use(model_id=data["model"])
        start, end = placement_suggest(model=model, num_blocks=data["blocks"])
        return Response(PlacementOutput({"model": model.model_id, "block_start": start, "block_end": end}).data)
