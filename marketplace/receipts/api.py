"""API: the platform key, job tickets, receipt uploads, settlements, finishing a job, disputes."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD
from marketplace.common.api import IsStaff, StrictIntegerField, parse, query_id
from marketplace.common.views import APIView, ListAPIView
from marketplace.jobs.api import JobOutput
from marketplace.jobs.selectors import job_get
from marketplace.ledger.services import MAX_AMOUNT
from marketplace.receipts.models import Audit, Dispute, Offence, Receipt, Settlement, Ticket
from marketplace.receipts.platform import platform_identity
from marketplace.receipts.selectors import (
    audit_get,
    audits_visible_to,
    dispute_get,
    disputes_visible_to,
    job_tickets_current,
    offences_visible_to,
    receipts_visible_to,
    settlements_visible_to,
)
from marketplace.receipts.services.audits import (
    AUDIT_DTYPES,
    MAX_AUDIT_TENSOR_BYTES,
    audit_create,
    audit_equivocation_create,
)
from marketplace.receipts.services.disputes import DISPUTE_CODES, dispute_verdict_record, receipt_dispute
from marketplace.receipts.services.finishing import job_finish
from marketplace.receipts.services.tickets import tickets_renew
from marketplace.receipts.services.uploads import receipts_upload


class PlatformLimitsOutput(serializers.Serializer):
    receipts_per_upload = serializers.IntegerField(help_text="the most receipts one POST /api/receipts/ may carry")


class PlatformOutput(serializers.Serializer):
    public_key = serializers.CharField(help_text="the platform's Ed25519 public key (hex); it signs job tickets")
    peer_id = serializers.CharField()
    fee_bps = serializers.IntegerField(help_text="platform fee on settled work, basis points")
    audit_deposit = serializers.IntegerField(help_text="micro-credits an audit without evidence must put down")
    limits = PlatformLimitsOutput(help_text="what one request may carry; clients split their work by these")


class TicketOutput(serializers.ModelSerializer):
    role = serializers.CharField()
    provider = serializers.IntegerField(source="provider_id")
    provider_peer = serializers.CharField(source="provider.peer_id")
    start = serializers.IntegerField(source="block_start")
    end = serializers.IntegerField(source="block_end")
    ticket = serializers.JSONField(source="signed", help_text="the signed ticket, as providers verify it")

    class Meta:
        model = Ticket
        fields = ["segment", "role", "rank", "provider", "provider_peer", "start", "end", "ticket"]


class ReceiptField(serializers.DictField):
    """A receipt object. An id that is an object or a list is refused here (400); every other
    field, and an id of the wrong scalar type, is checked per receipt (a ``rejected`` result)."""

    def to_internal_value(self, data: Any) -> dict:
        value = super().to_internal_value(data)
        for name in ("ticket_id", "session_id"):
            if isinstance(value.get(name), (dict, list)):
                raise serializers.ValidationError(f"{name} is a string, not an object or a list")
        return value


class ReceiptsInput(serializers.Serializer):
    receipts = serializers.ListField(
        child=ReceiptField(),
        min_length=1,
        max_length=MAX_RECEIPTS_PER_UPLOAD,
        help_text="signed work receipts (hivemart_core.protocol.receipts.WorkReceipt)",
    )


class ReceiptOutcomeOutput(serializers.Serializer):
    status = serializers.ChoiceField(choices=["accepted", "stale", "rejected"])
    code = serializers.CharField(help_text="why it was not accepted (a ReceiptError code), else empty")
    message = serializers.CharField()
    ticket_id = serializers.CharField()
    session_id = serializers.CharField()
    seq = serializers.IntegerField()


class UploadOutput(serializers.Serializer):
    results = ReceiptOutcomeOutput(many=True)


class ReceiptOutput(serializers.ModelSerializer):
    ticket_id = serializers.CharField(source="ticket.ticket_id")
    job = serializers.IntegerField(source="ticket.job_id")
    provider = serializers.IntegerField(source="ticket.provider_id")
    provider_peer = serializers.CharField(source="ticket.provider.peer_id")
    countersigned = serializers.SerializerMethodField()
    voided = serializers.SerializerMethodField()

    class Meta:
        model = Receipt
        fields = [
            "id",
            "ticket_id",
            "job",
            "provider",
            "provider_peer",
            "session_id",
            "seq",
            "units",
            "steps",
            "chain",
            "settled_units",
            "countersigned",
            "voided",
            "updated_at",
        ]

    def get_countersigned(self, receipt: Receipt) -> bool:
        return bool(receipt.client_signature)

    def get_voided(self, receipt: Receipt) -> bool:
        return receipt.ticket.voided_at is not None


class SettlementOutput(serializers.ModelSerializer):
    job = serializers.IntegerField(source="job_id")
    provider = serializers.IntegerField(source="provider_id")
    transaction = serializers.UUIDField(source="transaction_id", allow_null=True)

    class Meta:
        model = Settlement
        fields = ["id", "job", "provider", "units", "amount", "shortfall", "transaction", "created_at"]


class FinishInput(serializers.Serializer):
    receipts = serializers.ListField(
        child=ReceiptField(), required=False, default=list, max_length=MAX_RECEIPTS_PER_UPLOAD
    )


class FinishOutput(serializers.Serializer):
    job = JobOutput()
    results = ReceiptOutcomeOutput(many=True)


@extend_schema_field(OpenApiTypes.BYTE)
class Base64BytesField(serializers.Field):
    """Bytes sent as standard base64, at most ``max_bytes`` once decoded."""

    default_error_messages = {"invalid": "Expected base64 of 1 to {max_bytes} bytes."}

    def __init__(self, *, max_bytes: int, **kwargs: Any) -> None:
        self.max_bytes = max_bytes
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> bytes:
        # Check the length before decoding, so an oversized field costs no memory.
        if not isinstance(data, str) or not 0 < len(data) <= 4 * ((self.max_bytes + 2) // 3):
            self.fail("invalid", max_bytes=self.max_bytes)
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self.fail("invalid", max_bytes=self.max_bytes)
        if not 0 < len(decoded) <= self.max_bytes:
            self.fail("invalid", max_bytes=self.max_bytes)
        return decoded


class AuditInput(serializers.Serializer):
    job = StrictIntegerField(min_value=1)
    ticket_id = serializers.CharField(max_length=64, help_text="the audited provider's ticket")
    session_id = serializers.CharField(max_length=64)
    start = StrictIntegerField(min_value=0, max_value=4096)
    end = StrictIntegerField(min_value=1, max_value=4096)
    dtype = serializers.ChoiceField(choices=AUDIT_DTYPES, help_text="the dtype the providers served in")
    inputs = Base64BytesField(
        max_bytes=MAX_AUDIT_TENSOR_BYTES, help_text="encode_message({}, [hidden states at block start]) as base64"
    )
    claimed = Base64BytesField(max_bytes=MAX_AUDIT_TENSOR_BYTES, help_text="the audited provider's output")
    reference = Base64BytesField(max_bytes=MAX_AUDIT_TENSOR_BYTES, help_text="the backup's output")
    reference_peer = serializers.CharField(max_length=128, help_text="the backup's peer id")
    evidence = serializers.DictField(
        required=False,
        allow_null=True,
        default=None,
        help_text='{"receipt": provider-signed receipt of the session, "digests": '
        '[hex sha256 of every output], "step": index of the claimed output}',
    )
    deposit = StrictIntegerField(
        min_value=0,
        max_value=MAX_AMOUNT,
        required=False,
        default=0,
        help_text="micro-credits held from your wallet until the verdict (at least the "
        "platform's audit_deposit when there is no evidence): returned if the "
        "provider cheated, forfeited if the audit proves nothing",
    )


class EquivocationInput(serializers.Serializer):
    job = StrictIntegerField(min_value=1)
    ticket_id = serializers.CharField(max_length=64, help_text="the audited provider's ticket")
    records = serializers.ListField(
        child=serializers.DictField(),
        min_length=2,
        max_length=2,
        help_text="two step records the provider signed for one step of a session on "
        "the ticket that differ (the one that came with its output, the one "
        "the next provider received with its push)",
    )


class AuditOutput(serializers.ModelSerializer):
    job = serializers.IntegerField(source="job_id")
    ticket_id = serializers.CharField(source="ticket.ticket_id")
    provider = serializers.IntegerField(source="provider_id")
    reference_provider = serializers.IntegerField(source="reference_provider_id", allow_null=True)
    start = serializers.IntegerField(source="block_start")
    end = serializers.IntegerField(source="block_end")

    class Meta:
        model = Audit
        fields = [
            "id",
            "job",
            "ticket_id",
            "session_id",
            "provider",
            "reference_provider",
            "start",
            "end",
            "dtype",
            "claimed_proven",
            "deposit",
            "deposit_state",
            "state",
            "verdict",
            "detail",
            "created_at",
            "decided_at",
        ]


class OffenceOutput(serializers.ModelSerializer):
    provider = serializers.IntegerField(source="provider_id")
    job = serializers.IntegerField(source="job_id", allow_null=True)
    audit = serializers.IntegerField(source="audit_id", allow_null=True)

    class Meta:
        model = Offence
        fields = ["id", "provider", "kind", "job", "audit", "detail", "at"]


class DisputeInput(serializers.Serializer):
    receipt = serializers.DictField(help_text="the provider-signed receipt the client refused to countersign")
    code = serializers.ChoiceField(choices=DISPUTE_CODES, help_text="the check it failed (a ReceiptError code)")
    message = serializers.CharField(max_length=300, required=False, default="", allow_blank=True)


class DisputeVerdictInput(serializers.Serializer):
    verdict = serializers.ChoiceField(choices=Audit.Verdict.values)
    detail = serializers.CharField(max_length=500, required=False, default="", allow_blank=True)


class DisputeOutput(serializers.ModelSerializer):
    job = serializers.IntegerField(source="job_id")
    ticket_id = serializers.CharField(source="ticket.ticket_id")
    provider = serializers.IntegerField(source="provider_id")

    class Meta:
        model = Dispute
        fields = [
            "id",
            "job",
            "ticket_id",
            "provider",
            "session_id",
            "seq",
            "units",
            "code",
            "message",
            "state",
            "verdict",
            "detail",
            "created_at",
            "decided_at",
        ]


class Platform(APIView):
    """The platform's public key (which signs job tickets), fee and limits. No authentication."""

    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(responses=PlatformOutput)
    def get(self, request: Request) -> Response:
        identity = platform_identity()
        return Response(
            {
                "public_key": identity.public_key.hex(),
                "peer_id": identity.peer_id,
                "fee_bps": settings.HIVEMART_PLATFORM_FEE_BPS,
                "audit_deposit": settings.HIVEMART_AUDIT_DEPOSIT,
                "limits": {"receipts_per_upload": MAX_RECEIPTS_PER_UPLOAD},
            }
        )


class JobTickets(APIView):
    @extend_schema(
        responses=TicketOutput(many=True),
        description="The job's tickets for its current plan (its owner; staff): one per segment "
        "and provider, primaries and backups.",
    )
    def get(self, request: Request, job_id: int) -> Response:
        return Response(
            TicketOutput(job_tickets_current(job=job_get(user=request.user, job_id=job_id)), many=True).data
        )


class JobTicketsRenew(APIView):
    @extend_schema(
        request=None,
        responses=TicketOutput(many=True),
        description="Fresh tickets (new ids and expiry) for the current plan; old ones stay payable.",
    )
    def post(self, request: Request, job_id: int) -> Response:
        job = job_get(user=request.user, job_id=job_id)
        tickets_renew(job=job, by=request.user)
        return Response(TicketOutput(job_tickets_current(job=job), many=True).data)


class JobFinish(APIView):
    @extend_schema(
        request=FinishInput,
        responses=FinishOutput,
        description="Upload the last receipts (optional) and move the job to settling.",
    )
    def post(self, request: Request, job_id: int) -> Response:
        data = parse(FinishInput, request.data)
        job, outcomes = job_finish(
            job=job_get(user=request.user, job_id=job_id), by=request.user, receipts=data["receipts"]
        )
        return Response(
            {
                "job": JobOutput(job_get(user=request.user, job_id=job.pk)).data,
                "results": [o.to_dict() for o in outcomes],
            }
        )


class Receipts(ListAPIView):
    """Receipts of your jobs and your providers (staff: all); ``?job=`` filters. POST uploads
    a batch: the reply has one result per receipt, in order."""

    serializer_class = ReceiptOutput

    def get_queryset(self) -> QuerySet[Receipt]:
        receipts = receipts_visible_to(user=self.request.user).order_by("-id")
        job = query_id(self.request, "job")
        return receipts if job is None else receipts.filter(ticket__job_id=job)

    @extend_schema(parameters=[OpenApiParameter("job", int)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)

    @extend_schema(request=ReceiptsInput, responses=UploadOutput)
    def post(self, request: Request) -> Response:
        data = parse(ReceiptsInput, request.data)
        outcomes = receipts_upload(user=request.user, receipts=data["receipts"])
        return Response({"results": [o.to_dict() for o in outcomes]})


class Settlements(ListAPIView):
    """What settlement paid: per job and provider, newest first (your jobs and providers; staff: all)."""

    serializer_class = SettlementOutput

    def get_queryset(self) -> QuerySet[Settlement]:
        settlements = settlements_visible_to(user=self.request.user)
        for name, column in (("job", "job_id"), ("provider", "provider_id")):
            value = query_id(self.request, name)
            if value is not None:
                settlements = settlements.filter(**{column: value})
        return settlements

    @extend_schema(parameters=[OpenApiParameter("job", int), OpenApiParameter("provider", int)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)


class Audits(ListAPIView):
    """Audits of your jobs (staff: all), newest first; ``?job=`` filters. POST files one: the
    scheduler recomputes the span with the platform validator and records a verdict."""

    serializer_class = AuditOutput

    def get_queryset(self) -> QuerySet[Audit]:
        audits = audits_visible_to(user=self.request.user)
        job = query_id(self.request, "job")
        return audits if job is None else audits.filter(job_id=job)

    @extend_schema(parameters=[OpenApiParameter("job", int)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)

    @extend_schema(request=AuditInput, responses={201: AuditOutput})
    def post(self, request: Request) -> Response:
        data = parse(AuditInput, request.data)
        job = job_get(user=request.user, job_id=data.pop("job"))
        audit = audit_create(user=request.user, job=job, **data)
        return Response(AuditOutput(audit_get(user=request.user, audit_id=audit.pk)).data, status=201)


class AuditEquivocation(APIView):
    """File an audit whose evidence is two differing step records the provider signed for one
    step (it pushed the next provider another output than it returned): decided at once from
    the signatures, ``provider_cheated`` when they prove it."""

    @extend_schema(request=EquivocationInput, responses={201: AuditOutput})
    def post(self, request: Request) -> Response:
        data = parse(EquivocationInput, request.data)
        job = job_get(user=request.user, job_id=data.pop("job"))
        audit = audit_equivocation_create(user=request.user, job=job, **data)
        return Response(AuditOutput(audit_get(user=request.user, audit_id=audit.pk)).data, status=201)


class AuditDetail(APIView):
    @extend_schema(responses=AuditOutput)
    def get(self, request: Request, audit_id: int) -> Response:
        return Response(AuditOutput(audit_get(user=request.user, audit_id=audit_id)).data)


class Offences(ListAPIView):
    """What your providers were found doing (failed audits, wrong probe answers), newest first;
    staff see all. ``?provider=`` filters. Each lowered the provider's reputation."""

    serializer_class = OffenceOutput

    def get_queryset(self) -> QuerySet[Offence]:
        offences = offences_visible_to(user=self.request.user)
        provider = query_id(self.request, "provider")
        return offences if provider is None else offences.filter(provider_id=provider)

    @extend_schema(parameters=[OpenApiParameter("provider", int)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)


class JobDisputes(APIView):
    @extend_schema(responses=DisputeOutput(many=True), description="Disputes of this job (its owner; staff).")
    def get(self, request: Request, job_id: int) -> Response:
        job = job_get(user=request.user, job_id=job_id)
        return Response(DisputeOutput(disputes_visible_to(user=request.user).filter(job=job), many=True).data)

    @extend_schema(
        request=DisputeInput,
        responses={201: DisputeOutput, 200: DisputeOutput},
        description="Report a receipt the client refused to countersign. Until staff decide, the "
        "ticket's provider is paid only for countersigned work (no credit window). "
        "Reporting the same receipt again answers 200 with the first dispute.",
    )
    def post(self, request: Request, job_id: int) -> Response:
        data = parse(DisputeInput, request.data)
        dispute, created = receipt_dispute(user=request.user, job=job_get(user=request.user, job_id=job_id), **data)
        return Response(
            DisputeOutput(dispute_get(user=request.user, dispute_id=dispute.pk)).data, status=201 if created else 200
        )


class Disputes(ListAPIView):
    """Disputes of your jobs and against your providers (staff: all), newest first; ``?job=`` filters."""

    serializer_class = DisputeOutput

    def get_queryset(self) -> QuerySet[Dispute]:
        disputes = disputes_visible_to(user=self.request.user)
        job = query_id(self.request, "job")
        return disputes if job is None else disputes.filter(job_id=job)

    @extend_schema(parameters=[OpenApiParameter("job", int)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)


class DisputeVerdict(APIView):
    permission_classes = [IsStaff]

    @extend_schema(
        request=DisputeVerdictInput,
        responses=DisputeOutput,
        description="Staff decide a dispute: provider_cheated voids and claws back the provider's work "
        "on the job; any other verdict restores the ticket's credit window.",
    )
    def post(self, request: Request, dispute_id: int) -> Response:
        data = parse(DisputeVerdictInput, request.data)
        dispute_verdict_record(dispute_id=dispute_get(user=request.user, dispute_id=dispute_id).pk, **data)
        return Response(DisputeOutput(dispute_get(user=request.user, dispute_id=dispute_id)).data)
