"""API: sign-up, the current user, API keys."""

from __future__ import annotations

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle

from marketplace.accounts.models import ApiKey
from marketplace.accounts.selectors import api_key_get, api_keys_visible_to
from marketplace.accounts.services import api_key_create, api_key_revoke, user_signup
from marketplace.common.api import parse
from marketplace.common.errors import PermissionDenied
from marketplace.common.views import APIView, ListAPIView
from marketplace.ledger.selectors import wallet_balance


class ApiKeyOutput(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username", read_only=True)
    active = serializers.BooleanField(source="is_active", read_only=True)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "username", "active", "created_at", "last_used_at", "revoked_at"]


class CreatedApiKeyOutput(ApiKeyOutput):
    key = serializers.SerializerMethodField(help_text="the whole key; shown this once, store it now")

    class Meta(ApiKeyOutput.Meta):
        fields = ApiKeyOutput.Meta.fields + ["key"]

    def get_key(self, obj: ApiKey) -> str:
        return self.context["raw"]


class UserOutput(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.EmailField()
    is_staff = serializers.BooleanField()
    wallet_balance = serializers.SerializerMethodField(help_text="micro-credits")

    def get_wallet_balance(self, user) -> int:  # noqa: ANN001
        return wallet_balance(user=user)


class SignupInput(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=128, write_only=True)
    email = serializers.EmailField(required=False, default="", allow_blank=True, max_length=254)


class SignupOutput(serializers.Serializer):
    user = UserOutput()
    api_key = CreatedApiKeyOutput()


class ApiKeyInput(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)


class SignupView(APIView):
    """Create a user with a password (for the web) and a first API key (shown once)."""

    permission_classes = [AllowAny]
    authentication_classes: list = []
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "signup"

    @extend_schema(request=SignupInput, responses={201: SignupOutput}, auth=[])
    def post(self, request: Request) -> Response:
        if not settings.HIVEMART_OPEN_SIGNUP:
            raise PermissionDenied("sign-up is closed on this marketplace; ask its operator for an account")
        data = parse(SignupInput, request.data)
        user, created = user_signup(**data)
        return Response(
            {
                "user": UserOutput(user).data,
                "api_key": CreatedApiKeyOutput(created.key, context={"raw": created.raw}).data,
            },
            status=status.HTTP_201_CREATED,
        )


class MeView(APIView):
    @extend_schema(responses=UserOutput)
    def get(self, request: Request) -> Response:
        return Response(UserOutput(request.user).data)


class ApiKeyListCreate(ListAPIView):
    """Your API keys (staff: everyone's). POST creates one; its secret is in the answer only."""

    serializer_class = ApiKeyOutput

    def get_queryset(self) -> QuerySet[ApiKey]:
        return api_keys_visible_to(user=self.request.user)

    @extend_schema(request=ApiKeyInput, responses={201: CreatedApiKeyOutput})
    def post(self, request: Request) -> Response:
        data = parse(ApiKeyInput, request.data)
        created = api_key_create(user=request.user, name=data["name"])
        return Response(
            CreatedApiKeyOutput(created.key, context={"raw": created.raw}).data, status=status.HTTP_201_CREATED
        )


class ApiKeyDetail(APIView):
    @extend_schema(responses=ApiKeyOutput)
    def get(self, request: Request, key_id: int) -> Response:
        return Response(ApiKeyOutput(api_key_get(user=request.user, key_id=key_id)).data)

    @extend_schema(responses=ApiKeyOutput, description="Revoke the key (it stays listed, inactive).")
    def delete(self, request: Request, key_id: int) -> Response:
        key = api_key_revoke(key=api_key_get(user=request.user, key_id=key_id), by=request.user)
        return Response(ApiKeyOutput(key).data)
