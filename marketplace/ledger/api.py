"""API: accounts, postings and holds (read), staff grants and staff-recorded payouts.

Providers ask for payouts with ``POST /api/payouts/`` (``marketplace.payments``): a request held
until staff approve it. ``POST /api/ledger/payouts/`` is staff recording a payout made outside
that flow."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.accounts.models import User
from marketplace.common.api import IsStaff, StrictIntegerField, parse, query_id
from marketplace.common.errors import ValidationFailed
from marketplace.common.views import APIView, ListAPIView
from marketplace.ledger.models import Account, Hold, Posting, Transaction
from marketplace.ledger.selectors import (
    account_get,
    accounts_visible_to,
    hold_get,
    holds_visible_to,
    postings_visible_to,
)
from marketplace.ledger.services import IDEMPOTENCY_KEY_MAX, MAX_AMOUNT, credit_grant, payout, wallet_get_or_create


class AccountOutput(serializers.ModelSerializer):
    class Meta:
        model = Account
        fields = ["id", "kind", "label", "balance", "created_at"]


class PostingOutput(serializers.ModelSerializer):
    transaction = serializers.UUIDField(source="transaction_id")
    kind = serializers.CharField(source="transaction.kind")
    memo = serializers.CharField(source="transaction.memo")
    created_at = serializers.DateTimeField(source="transaction.created_at")
    account_kind = serializers.CharField(source="account.kind")

    class Meta:
        model = Posting
        fields = ["id", "transaction", "kind", "account", "account_kind", "amount", "memo", "created_at"]


class HoldOutput(serializers.ModelSerializer):
    left = serializers.IntegerField(source="escrow.balance", help_text="micro-credits still held")

    class Meta:
        model = Hold
        fields = ["id", "state", "amount", "left", "payer", "escrow", "memo", "created_at", "closed_at"]


class TransactionOutput(serializers.ModelSerializer):
    idempotency_key = serializers.CharField(source="request_key", allow_null=True, help_text="the key as you sent it")
    postings = serializers.SerializerMethodField()

    class Meta:
        model = Transaction
        fields = ["id", "kind", "idempotency_key", "memo", "created_at", "postings"]

    def get_postings(self, obj: Transaction) -> list[dict]:
        return [{"account": p.account_id, "amount": p.amount} for p in obj.postings.all()]


class GrantInput(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    amount = StrictIntegerField(min_value=1, max_value=MAX_AMOUNT, help_text="micro-credits")
    memo = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    idempotency_key = serializers.CharField(
        max_length=IDEMPOTENCY_KEY_MAX,
        required=False,
        allow_null=True,
        default=None,
        help_text="yours alone: no other user's key collides",
    )


class PayoutInput(serializers.Serializer):
    account = StrictIntegerField(min_value=1, help_text="a provider earnings account")
    amount = StrictIntegerField(min_value=1, max_value=MAX_AMOUNT)
    memo = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    idempotency_key = serializers.CharField(
        max_length=IDEMPOTENCY_KEY_MAX,
        required=False,
        allow_null=True,
        default=None,
        help_text="yours alone: no other user's key collides",
    )


class AccountList(ListAPIView):
    """Your ledger accounts: wallet, provider earnings, escrows of your holds (staff: all)."""

    serializer_class = AccountOutput

    def get_queryset(self) -> QuerySet[Account]:
        return accounts_visible_to(user=self.request.user)


class AccountDetail(APIView):
    @extend_schema(responses=AccountOutput)
    def get(self, request: Request, account_id: int) -> Response:
        return Response(AccountOutput(account_get(user=request.user, account_id=account_id)).data)


class PostingList(ListAPIView):
    """Postings on your accounts, newest first; ``?account=ID`` narrows to one account."""

    serializer_class = PostingOutput

    def get_queryset(self) -> QuerySet[Posting]:
        postings = postings_visible_to(user=self.request.user)
        account = query_id(self.request, "account")
        return postings if account is None else postings.filter(account_id=account)

    @extend_schema(parameters=[OpenApiParameter("account", int)])
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)


class HoldList(ListAPIView):
    serializer_class = HoldOutput

    def get_queryset(self) -> QuerySet[Hold]:
        return holds_visible_to(user=self.request.user)


class HoldDetail(APIView):
    @extend_schema(responses=HoldOutput)
    def get(self, request: Request, hold_id: int) -> Response:
        return Response(HoldOutput(hold_get(user=request.user, hold_id=hold_id)).data)


class GrantView(APIView):
    """Staff: grant credits to a user's wallet (from the external account)."""

    permission_classes = [IsStaff]

    @extend_schema(request=GrantInput, responses={201: TransactionOutput})
    def post(self, request: Request) -> Response:
        data = parse(GrantInput, request.data)
        user = User.objects.filter(username=data.pop("username")).first()
        if user is None:
            raise ValidationFailed("no such user", extra={"field": "username"})
        tx = credit_grant(account=wallet_get_or_create(user=user), granted_by=request.user, **data)
        return Response(TransactionOutput(tx).data, status=status.HTTP_201_CREATED)


class PayoutView(APIView):
    """Staff: pay credits out of a provider's earnings account at once (a payout made outside the
    request flow). Providers ask with ``POST /api/payouts/``, which staff approve."""

    permission_classes = [IsStaff]

    @extend_schema(request=PayoutInput, responses={201: TransactionOutput})
    def post(self, request: Request) -> Response:
        data = parse(PayoutInput, request.data)
        account = account_get(user=request.user, account_id=data.pop("account"))
        tx = payout(account=account, requested_by=request.user, **data)
        return Response(TransactionOutput(tx).data, status=status.HTTP_201_CREATED)
