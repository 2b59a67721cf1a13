"""API: top-ups (buy credits through the payment provider), the payment provider's webhook,
and payout requests (ask for earnings to be paid out; staff approve, reject, mark paid)."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.common.api import IsStaff, StrictIntegerField, parse
from marketplace.common.views import APIView, ListAPIView
from marketplace.ledger.services import IDEMPOTENCY_KEY_MAX, MAX_AMOUNT
from marketplace.payments.models import PayoutRequest, TopUp
from marketplace.payments.selectors import (
    payout_request_get,
    payout_requests_visible_to,
    topup_get,
    topups_visible_to,
)
from marketplace.payments.services import (
    payment_webhook_handle,
    payout_approve,
    payout_mark_paid,
    payout_reject,
    payout_request_create,
    topup_create,
    topup_test_pay,
)

_KEY_HELP = "yours alone: a retry with the same key returns the same record"


class TopUpOutput(serializers.ModelSerializer):
    checkout_url = serializers.SerializerMethodField(help_text="where the buyer pays (absolute)")

    class Meta:
        model = TopUp
        fields = [
            "id",
            "state",
            "provider",
            "credits",
            "amount_minor",
            "currency",
            "checkout_url",
            "created_at",
            "paid_at",
        ]

    def get_checkout_url(self, obj: TopUp) -> str:
        request = self.context.get("request")
        url = obj.checkout_url
        return request.build_absolute_uri(url) if request is not None and url.startswith("/") else url


class TopUpInput(serializers.Serializer):
    credits = StrictIntegerField(min_value=1, max_value=10**9, help_text="whole credits to buy")
    idempotency_key = serializers.CharField(
        max_length=IDEMPOTENCY_KEY_MAX - 40, required=False, allow_null=True, default=None, help_text=_KEY_HELP
    )


class PayoutRequestOutput(serializers.ModelSerializer):
    class Meta:
        model = PayoutRequest
        fields = ["id", "state", "provider", "amount", "memo", "note", "created_at", "decided_at", "paid_at"]


class PayoutRequestInput(serializers.Serializer):
    provider = StrictIntegerField(min_value=1, help_text="one of your providers")
    amount = StrictIntegerField(min_value=1, max_value=MAX_AMOUNT, help_text="micro-credits of its earnings")
    memo = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    idempotency_key = serializers.CharField(
        max_length=IDEMPOTENCY_KEY_MAX - 40, required=False, allow_null=True, default=None, help_text=_KEY_HELP
    )


class DecisionInput(serializers.Serializer):
    note = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)


class PaidInput(serializers.Serializer):
    reference = serializers.CharField(max_length=200, help_text="the outside payment's id (bank transfer, ...)")


def _return_urls(request: Request, topup_hint: str = "") -> tuple[str, str]:
    wallet = request.build_absolute_uri("/wallet/")
    return f"{wallet}?topup=done{topup_hint}", f"{wallet}?topup=cancelled"


class TopUpList(ListAPIView):
    """Your top-ups, newest first (staff: all)."""

    serializer_class = TopUpOutput

    def get_queryset(self) -> QuerySet[TopUp]:
        return topups_visible_to(user=self.request.user)

    @extend_schema(request=TopUpInput, responses={201: TopUpOutput})
    def post(self, request: Request) -> Response:
        """Buy credits: answers a pending top-up whose ``checkout_url`` is the payment page. The
        wallet is credited once the payment provider reports it paid."""
        data = parse(TopUpInput, request.data)
        success_url, cancel_url = _return_urls(request)
        topup = topup_create(
            user=request.user,
            credits=data["credits"],
            success_url=success_url,
            cancel_url=cancel_url,
            idempotency_key=data["idempotency_key"],
        )
        return Response(TopUpOutput(topup, context={"request": request}).data, status=status.HTTP_201_CREATED)


class TopUpDetail(APIView):
    @extend_schema(responses=TopUpOutput)
    def get(self, request: Request, topup_id: int) -> Response:
        topup = topup_get(user=request.user, topup_id=topup_id)
        return Response(TopUpOutput(topup, context={"request": request}).data)


class TopUpTestPay(APIView):
    """Pay one of your own test top-ups (only where the test payment provider is enabled)."""

    @extend_schema(request=None, responses=TopUpOutput)
    def post(self, request: Request, topup_id: int) -> Response:
        topup = topup_test_pay(user=request.user, topup_id=topup_id)
        return Response(TopUpOutput(topup, context={"request": request}).data)


class StripeWebhook(APIView):
    """Stripe's calls (``checkout.session.completed`` and the like), authenticated by their
    ``Stripe-Signature`` rather than by a user: no API key, no session."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(request=None, responses={200: OpenApiResponse(description='{"outcome": "applied"}')})
    def post(self, request: Request) -> Response:
        # The signature covers the exact bytes, so the body is read raw, never parsed first.
        outcome = payment_webhook_handle(gateway_name="stripe", payload=request.body, headers=request.headers)
        return Response({"outcome": outcome})


class PayoutList(ListAPIView):
    """Your payout requests, newest first (staff: all)."""

    serializer_class = PayoutRequestOutput

    def get_queryset(self) -> QuerySet[PayoutRequest]:
        return payout_requests_visible_to(user=self.request.user)

    @extend_schema(request=PayoutRequestInput, responses={201: PayoutRequestOutput})
    def post(self, request: Request) -> Response:
        """Ask for earnings of one of your providers to be paid out; the amount is held until
        staff decide."""
        data = parse(PayoutRequestInput, request.data)
        payout = payout_request_create(
            user=request.user,
            provider_id=data["provider"],
            amount=data["amount"],
            memo=data["memo"],
            idempotency_key=data["idempotency_key"],
        )
        return Response(PayoutRequestOutput(payout).data, status=status.HTTP_201_CREATED)


class PayoutDetail(APIView):
    @extend_schema(responses=PayoutRequestOutput)
    def get(self, request: Request, request_id: int) -> Response:
        return Response(PayoutRequestOutput(payout_request_get(user=request.user, request_id=request_id)).data)


class PayoutApprove(APIView):
    """Staff: approve a requested payout (its credits leave the platform)."""

    permission_classes = [IsStaff]

    @extend_schema(request=DecisionInput, responses=PayoutRequestOutput)
    def post(self, request: Request, request_id: int) -> Response:
        note = parse(DecisionInput, request.data)["note"]
        return Response(PayoutRequestOutput(payout_approve(request_id=request_id, by=request.user, note=note)).data)


class PayoutReject(APIView):
    """Staff: reject a requested payout (its credits return to the provider's earnings)."""

    permission_classes = [IsStaff]

    @extend_schema(request=DecisionInput, responses=PayoutRequestOutput)
    def post(self, request: Request, request_id: int) -> Response:
        note = parse(DecisionInput, request.data)["note"]
        return Response(PayoutRequestOutput(payout_reject(request_id=request_id, by=request.user, note=note)).data)


class PayoutPaid(APIView):
    """Staff: record that an approved payout's money was sent."""

    permission_classes = [IsStaff]

    @extend_schema(request=PaidInput, responses=PayoutRequestOutput)
    def post(self, request: Request, request_id: int) -> Response:
        reference = parse(PaidInput, request.data)["reference"]
        return Response(
            PayoutRequestOutput(payout_mark_paid(request_id=request_id, by=request.user, reference=reference)).data
        )
