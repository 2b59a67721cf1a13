"""API: jobs, their transitions and plans."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.common.api import StrictFloatField, StrictIntegerField, parse
from marketplace.common.errors import NotFound, PermissionDenied, ValidationFailed
from marketplace.common.idempotency import HEADER
from marketplace.common.views import APIView, ListAPIView
from marketplace.jobs.models import Job, JobTransition, Plan
from marketplace.jobs.selectors import (
    job_failure_reason,
    job_get,
    job_plan_current,
    job_transitions,
    jobs_visible_to,
)
from marketplace.jobs.services import (
    MAX_THROUGHPUT,
    SegmentSpec,
    job_cancel,
    job_create,
    job_plan_store,
    job_transition_request,
)
from marketplace.ledger.selectors import hold_money
from marketplace.ledger.services import MAX_AMOUNT
from marketplace.providers.services import MAX_PRICE

IDEMPOTENCY_HEADER = HEADER  # read by every POST (marketplace.common.idempotency); job creation needs one


class HoldSummary(serializers.Serializer):
    id = serializers.IntegerField()
    amount = serializers.IntegerField()
    left = serializers.IntegerField(source="escrow.balance", help_text="micro-credits still held")
    state = serializers.CharField()


class CostOutput(serializers.Serializer):
    """Where the job's hold is (``marketplace.ledger.selectors.hold_money``); all micro-credits."""

    held = serializers.IntegerField(help_text="still held for the job")
    spent = serializers.IntegerField(help_text="paid to providers and fees (less clawbacks)")
    refunded = serializers.IntegerField(help_text="returned to the wallet")
    forfeited = serializers.IntegerField(help_text="taken as a penalty (rare)")


class JobOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.model_id")
    hold = HoldSummary(allow_null=True)
    cost = serializers.SerializerMethodField(help_text="held/spent/refunded; null for a job without a hold")
    failure_reason = serializers.SerializerMethodField(help_text="why the job failed; empty unless it did")

    @extend_schema_field(CostOutput(allow_null=True))
    def get_cost(self, job: Job) -> dict | None:
        money = getattr(job, "money", None)
        if money is None and job.hold is not None:
            money = hold_money(holds=[job.hold])[job.hold.pk]
        return None if money is None else CostOutput(money).data

    def get_failure_reason(self, job: Job) -> str:
        return job_failure_reason(job)

    class Meta:
        model = Job
        fields = [
            "id",
            "kind",
            "model",
            "state",
            "budget",
            "max_price",
            "min_throughput",
            "idempotency_key",
            "client_key",
            "hold",
            "cost",
            "failure_reason",
            "created_at",
            "updated_at",
        ]


class TransitionOutput(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor.username", allow_null=True, default=None)

    class Meta:
        model = JobTransition
        fields = ["id", "from_state", "to_state", "reason", "actor", "at"]


class BackupOutput(serializers.Serializer):
    rank = serializers.IntegerField()
    provider = serializers.IntegerField(source="provider_id")
    peer_id = serializers.CharField(source="provider.peer_id")
    price = serializers.IntegerField()


class SegmentOutput(serializers.Serializer):
    index = serializers.IntegerField()
    block_start = serializers.IntegerField()
    block_end = serializers.IntegerField()
    provider = serializers.IntegerField(source="provider_id")
    peer_id = serializers.CharField(source="provider.peer_id")
    price = serializers.IntegerField()
    backups = BackupOutput(many=True)


class PlanOutput(serializers.ModelSerializer):
    job = serializers.IntegerField(source="job_id")
    segments = SegmentOutput(many=True)

    class Meta:
        model = Plan
        fields = ["job", "version", "reason", "created_at", "segments"]


class JobInput(serializers.Serializer):
    kind = serializers.ChoiceField(choices=Job.Kind.choices)
    model = serializers.CharField(max_length=128, help_text="a catalogued model_id")
    budget = StrictIntegerField(min_value=1, max_value=MAX_AMOUNT, help_text="micro-credits to hold")
    max_price = StrictIntegerField(min_value=0, max_value=MAX_PRICE, help_text="micro-credits per million work units")
    min_throughput = StrictFloatField(required=False, allow_null=True, default=None, max_value=MAX_THROUGHPUT)
    idempotency_key = serializers.CharField(
        max_length=200, required=False, help_text=f"or the {IDEMPOTENCY_HEADER} header (which wins)"
    )
    client_key = serializers.RegexField(
        r"^[0-9a-fA-F]{64}$",
        required=False,
        default="",
        allow_blank=True,
        help_text="the client's hex Ed25519 public key for this job (countersigns work receipts)",
    )


class TransitionInput(serializers.Serializer):
    to_state = serializers.ChoiceField(choices=Job.State.choices)
    reason = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)


class CancelInput(serializers.Serializer):
    reason = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)


class SegmentInput(serializers.Serializer):
    block_start = StrictIntegerField(min_value=0, max_value=4096)
    block_end = StrictIntegerField(min_value=1, max_value=4096)
    provider = StrictIntegerField(min_value=1)
    backups = serializers.ListField(child=StrictIntegerField(min_value=1), required=False, default=list, max_length=16)
    price = StrictIntegerField(min_value=0, max_value=MAX_PRICE, required=False, allow_null=True, default=None)


class PlanInput(serializers.Serializer):
    segments = serializers.ListField(child=SegmentInput(), min_length=1, max_length=4096)
    reason = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)


class JobListCreate(ListAPIView):
    """Your jobs (staff: all), newest first; ``?state=`` filters. POST creates one and holds its budget."""

    serializer_class = JobOutput

    def paginate_queryset(self, queryset: QuerySet[Job]) -> list[Job] | None:
        page = super().paginate_queryset(queryset)
        if page is not None:  # one query for the whole page's held/spent/refunded
            money = hold_money(holds=[job.hold for job in page])
            for job in page:
                job.money = money.get(job.hold_id) if job.hold_id else None
        return page

    def get_queryset(self) -> QuerySet[Job]:
        jobs = jobs_visible_to(user=self.request.user)
        state = self.request.query_params.get("state")
        if state is not None:
            if state not in Job.State.values:
                raise ValidationFailed(f"state is one of {', '.join(Job.State.values)}", extra={"field": "state"})
            jobs = jobs.filter(state=state)
        return jobs

    @extend_schema(parameters=[OpenApiParameter("state", str, enum=Job.State.values)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=JobInput,
        responses={201: JobOutput, 200: JobOutput},
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                str,
                OpenApiParameter.HEADER,
                description="retrying with the same key returns the same job (200)",
            )
        ],
    )
    def post(self, request: Request) -> Response:
        data = parse(JobInput, request.data)
        key = request.headers.get(IDEMPOTENCY_HEADER) or data.get("idempotency_key")
        if not key:
            raise ValidationFailed(
                f"send an {IDEMPOTENCY_HEADER} header (or an idempotency_key field)", extra={"field": "idempotency_key"}
            )
        job, created = job_create(
            user=request.user,
            kind=data["kind"],
            model_id=data["model"],
            budget=data["budget"],
            max_price=data["max_price"],
            min_throughput=data["min_throughput"],
            idempotency_key=key,
            client_key=data["client_key"],
        )
        job = job_get(user=request.user, job_id=job.pk)
        return Response(JobOutput(job).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class JobDetail(APIView):
    @extend_schema(responses=JobOutput)
    def get(self, request: Request, job_id: int) -> Response:
        return Response(JobOutput(job_get(user=request.user, job_id=job_id)).data)


class JobCancel(APIView):
    @extend_schema(request=CancelInput, responses=JobOutput)
    def post(self, request: Request, job_id: int) -> Response:
        data = parse(CancelInput, request.data)
        job = job_cancel(job=job_get(user=request.user, job_id=job_id), by=request.user, reason=data["reason"])
        return Response(JobOutput(job_get(user=request.user, job_id=job.pk)).data)


class JobTransitions(ListAPIView):
    """A job's transitions, oldest first. POST asks for one: owners may move their job to
    running, settling or cancelled; staff (the scheduler) to any state the machine allows."""

    serializer_class = TransitionOutput
    pagination_class = None  # a job has a handful of transitions

    def get_queryset(self) -> QuerySet[JobTransition]:
        return job_transitions(job=job_get(user=self.request.user, job_id=self.kwargs["job_id"])).select_related(
            "actor"
        )

    @extend_schema(request=TransitionInput, responses=JobOutput)
    def post(self, request: Request, job_id: int) -> Response:
        data = parse(TransitionInput, request.data)
        job = job_transition_request(job=job_get(user=request.user, job_id=job_id), by=request.user, **data)
        return Response(JobOutput(job_get(user=request.user, job_id=job.pk)).data)


class JobPlan(APIView):
    @extend_schema(responses=PlanOutput, description="The job's current (newest) plan; 404 before planning.")
    def get(self, request: Request, job_id: int) -> Response:
        plan = job_plan_current(job=job_get(user=request.user, job_id=job_id))
        if plan is None:
            raise NotFound("this job has no plan yet")
        return Response(PlanOutput(plan).data)

    @extend_schema(request=PlanInput, responses={201: PlanOutput}, description="Staff (the scheduler): store a plan.")
    def post(self, request: Request, job_id: int) -> Response:
        if not request.user.is_staff:
            raise PermissionDenied("only the scheduler (staff) stores plans")
        data = parse(PlanInput, request.data)
        job = job_get(user=request.user, job_id=job_id)
        segments = [
            SegmentSpec(
                block_start=s["block_start"],
                block_end=s["block_end"],
                provider=s["provider"],
                backups=s["backups"],
                price=s["price"],
            )
            for s in data["segments"]
        ]
        job_plan_store(job=job, segments=segments, reason=data["reason"])
        return Response(PlanOutput(job_plan_current(job=job)).data, status=status.HTTP_201_CREATED)
