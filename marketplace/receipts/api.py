"""API: the platform key, job tickets, receipt uploads, settlements, finishing a job."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.generics import ListAPIView
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.common.api import parse
from marketplace.common.errors import ValidationFailed
from marketplace.jobs.api import JobOutput
from marketplace.jobs.selectors import job_get
from marketplace.receipts.models import Receipt, Settlement, Ticket
from marketplace.receipts.platform import platform_identity
from marketplace.receipts.selectors import job_tickets_current, receipts_visible_to, settlements_visible_to
from marketplace.receipts.services import MAX_RECEIPTS_PER_UPLOAD, job_finish, receipts_upload, tickets_renew


class PlatformOutput(serializers.Serializer):
    public_key = serializers.CharField(help_text="the platform's Ed25519 public key (hex); it signs job tickets")
    peer_id = serializers.CharField()
    fee_bps = serializers.IntegerField(help_text="platform fee on settled work, basis points")


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


class ReceiptsInput(serializers.Serializer):
    receipts = serializers.ListField(child=serializers.DictField(), min_length=1, max_length=MAX_RECEIPTS_PER_UPLOAD,
                                     help_text="signed work receipts (client_sdk.protocol.receipts.WorkReceipt)")


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
        fields = ["id", "ticket_id", "job", "provider", "provider_peer", "session_id", "seq", "units", "steps",
                  "chain", "settled_units", "countersigned", "voided", "updated_at"]

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
    receipts = serializers.ListField(child=serializers.DictField(), required=False, default=list,
                                     max_length=MAX_RECEIPTS_PER_UPLOAD)


class FinishOutput(serializers.Serializer):
    job = JobOutput()
    results = ReceiptOutcomeOutput(many=True)


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise ValidationFailed(f"{name} is a positive integer", extra={"field": name})
    return int(value)


class Platform(APIView):
    """The platform's public key (which signs job tickets) and fee. No authentication."""

    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []

    @extend_schema(responses=PlatformOutput)
    def get(self, request: Request) -> Response:
        identity = platform_identity()
        return Response({"public_key": identity.public_key.hex(), "peer_id": identity.peer_id,
                         "fee_bps": settings.HIVEMART_PLATFORM_FEE_BPS})


class JobTickets(APIView):
    @extend_schema(responses=TicketOutput(many=True),
                   description="The job's tickets for its current plan (its owner; staff): one per segment "
                               "and provider, primaries and backups.")
    def get(self, request: Request, job_id: int) -> Response:
        return Response(TicketOutput(job_tickets_current(job=job_get(user=request.user, job_id=job_id)),
                                     many=True).data)


class JobTicketsRenew(APIView):
    @extend_schema(request=None, responses=TicketOutput(many=True),
                   description="Fresh tickets (new ids and expiry) for the current plan; old ones stay payable.")
    def post(self, request: Request, job_id: int) -> Response:
        job = job_get(user=request.user, job_id=job_id)
        tickets_renew(job=job, by=request.user)
        return Response(TicketOutput(job_tickets_current(job=job), many=True).data)


class JobFinish(APIView):
    @extend_schema(request=FinishInput, responses=FinishOutput,
                   description="Upload the last receipts (optional) and move the job to settling.")
    def post(self, request: Request, job_id: int) -> Response:
        data = parse(FinishInput, request.data)
        job, outcomes = job_finish(job=job_get(user=request.user, job_id=job_id), by=request.user,
                                   receipts=data["receipts"])
        return Response({"job": JobOutput(job_get(user=request.user, job_id=job.pk)).data,
                         "results": [o.to_dict() for o in outcomes]})


class Receipts(ListAPIView):
    """Receipts of your jobs and your providers (staff: all); ``?job=`` filters. POST uploads
    a batch: the reply has one result per receipt, in order."""

    serializer_class = ReceiptOutput

    def get_queryset(self) -> QuerySet[Receipt]:
        receipts = receipts_visible_to(user=self.request.user).order_by("-id")
        job = _int_param(self.request, "job")
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
            value = _int_param(self.request, name)
            if value is not None:
                settlements = settlements.filter(**{column: value})
        return settlements

    @extend_schema(parameters=[OpenApiParameter("job", int), OpenApiParameter("provider", int)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)
