"""API: provider registration, heartbeats, offers, measurements."""

from __future__ import annotations

from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle

from hivemart_core.figures import price_per_million_tokens
from marketplace.catalog.selectors import catalog_model_for_use, catalog_model_get
from marketplace.common.api import HexBytesField, IsStaff, StrictFloatField, StrictIntegerField, parse
from marketplace.common.errors import PermissionDenied
from marketplace.common.views import APIView, ListAPIView
from marketplace.providers.models import Provider, ProviderMeasurement
from marketplace.providers.selectors import (
    ProviderOffer,
    Uptime,
    offers_for_model,
    provider_get,
    provider_measurements,
    provider_offer,
    provider_public_get,
    provider_uptimes,
    providers_public,
    providers_visible_to,
)
from marketplace.providers.services import (
    HEARTBEAT_STATES,
    MAX_GPU_MEMORY_MB,
    MAX_PRICE,
    REGISTRATION_PREFIX,
    OfferSpec,
    challenge_issue,
    provider_heartbeat,
    provider_measurement_record,
    provider_offer_update,
    provider_register,
    provider_reinstate,
    provider_suspend,
)

_BLOCK = dict(min_value=0, max_value=4096)


class MeasurementOutput(serializers.ModelSerializer):
    class Meta:
        model = ProviderMeasurement
        fields = ["id", "throughput", "latency_ms", "success_rate", "samples", "measured_at"]


class ProviderOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.model_id")
    measurement = MeasurementOutput(
        source="latest_measurement",
        allow_null=True,
        help_text="the scheduler's latest measurement; it overrides reported figures",
    )
    suspended = serializers.BooleanField(source="is_suspended")
    earnings_account = serializers.IntegerField(source="earnings_account_id")

    class Meta:
        model = Provider
        fields = [
            "id",
            "peer_id",
            "public_key",
            "name",
            "gpu",
            "gpu_memory_mb",
            "region",
            "model",
            "block_start",
            "block_end",
            "price",
            "state",
            "last_heartbeat_at",
            "reported_throughput",
            "reported_latency_ms",
            "measurement",
            "suspended",
            "suspension_reason",
            "reputation",
            "earnings_account",
            "registered_at",
        ]


class UptimeOutput(serializers.Serializer):
    fraction = serializers.FloatField(allow_null=True, help_text="share of `observed_s` spent online")
    observed_s = serializers.SerializerMethodField(
        help_text="seconds of record: the window, or less for a newer provider"
    )
    window_s = serializers.SerializerMethodField(help_text="the nominal window, seconds")
    text = serializers.CharField(source="__str__", help_text='e.g. "97.0% over the last 24 h"')

    def get_observed_s(self, uptime: Uptime) -> float:
        return uptime.observed.total_seconds()

    def get_window_s(self, uptime: Uptime) -> float:
        return uptime.window.total_seconds()


class PublicProviderOutput(serializers.Serializer):
    """What anyone in the market may see of a provider, as on the web's providers page: its
    offer, figures and record. Never its owner, API keys, accounts or suspension details;
    ``mine`` tells its owner to ask ``/api/providers/<id>/`` for the rest."""

    id = serializers.IntegerField(source="pk")
    peer_id = serializers.CharField()
    name = serializers.CharField()
    gpu = serializers.CharField()
    gpu_memory_mb = serializers.IntegerField()
    region = serializers.CharField()
    model = serializers.CharField(source="model.model_id")
    block_start = serializers.IntegerField()
    block_end = serializers.IntegerField()
    price = serializers.IntegerField(help_text="micro-credits per million work units")
    price_per_million_tokens = serializers.SerializerMethodField(
        help_text="micro-credits per million tokens through the whole span (price x blocks)"
    )
    state = serializers.CharField()
    suspended = serializers.BooleanField(source="is_suspended")
    reputation = serializers.IntegerField()
    throughput = serializers.SerializerMethodField(help_text="work units (tokens through one block) per second")
    latency_ms = serializers.SerializerMethodField(help_text="one hop and one block, ms per token")
    success_rate = serializers.SerializerMethodField()
    measured = serializers.SerializerMethodField(help_text="figures from the scheduler's probes, not self-reported")
    measured_at = serializers.SerializerMethodField()
    uptime = serializers.SerializerMethodField()
    last_heartbeat_at = serializers.DateTimeField(allow_null=True)
    registered_at = serializers.DateTimeField()
    mine = serializers.SerializerMethodField(help_text="the caller owns it")

    def _offer(self, provider: Provider) -> ProviderOffer:
        return provider_offer(provider=provider)

    def get_price_per_million_tokens(self, provider: Provider) -> int:
        return price_per_million_tokens(provider.price, provider.block_end - provider.block_start)

    def get_throughput(self, provider: Provider) -> float | None:
        return self._offer(provider).throughput

    def get_latency_ms(self, provider: Provider) -> float | None:
        return self._offer(provider).latency_ms

    def get_success_rate(self, provider: Provider) -> float | None:
        return self._offer(provider).success_rate

    def get_measured(self, provider: Provider) -> bool:
        return self._offer(provider).measured

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_measured_at(self, provider: Provider) -> str | None:
        at = self._offer(provider).measured_at
        return None if at is None else serializers.DateTimeField().to_representation(at)

    @extend_schema_field(UptimeOutput)
    def get_uptime(self, provider: Provider) -> dict:
        return UptimeOutput(self.context["uptimes"][provider.pk]).data

    def get_mine(self, provider: Provider) -> bool:
        return provider.user_id == self.context["request"].user.pk


class OfferOutput(serializers.Serializer):
    provider_id = serializers.IntegerField()
    peer_id = serializers.CharField()
    model_id = serializers.CharField()
    block_start = serializers.IntegerField()
    block_end = serializers.IntegerField()
    price = serializers.IntegerField(help_text="micro-credits per million work units")
    price_per_million_tokens = serializers.SerializerMethodField(
        help_text="micro-credits per million tokens through the whole span (price x blocks)"
    )
    throughput = serializers.FloatField(allow_null=True, help_text="work units per second")
    latency_ms = serializers.FloatField(allow_null=True)
    success_rate = serializers.FloatField(allow_null=True)
    measured = serializers.BooleanField(help_text="figures measured by the scheduler, not self-reported")
    measured_at = serializers.DateTimeField(allow_null=True)
    region = serializers.CharField()
    state = serializers.CharField()
    last_heartbeat_at = serializers.DateTimeField(allow_null=True)

    def get_price_per_million_tokens(self, offer: ProviderOffer) -> int:
        return price_per_million_tokens(offer.price, offer.block_end - offer.block_start)


class ChallengeOutput(serializers.Serializer):
    challenge = serializers.CharField(help_text="32 random bytes as 64 hex characters; single use")
    expires_at = serializers.DateTimeField()
    message_prefix = serializers.CharField(
        help_text="sign message_prefix (ASCII) followed by the 32 raw challenge bytes"
    )


class RegisterInput(serializers.Serializer):
    peer_id = serializers.CharField(max_length=128)
    public_key = HexBytesField(length=32, help_text="raw Ed25519 public key, 64 hex characters")
    challenge = serializers.CharField(max_length=64)
    signature = HexBytesField(length=64, help_text="Ed25519 signature, 128 hex characters")
    model = serializers.CharField(max_length=128, help_text="a catalogued model_id")
    block_start = StrictIntegerField(**_BLOCK)
    block_end = StrictIntegerField(**_BLOCK)
    price = StrictIntegerField(min_value=0, max_value=MAX_PRICE, help_text="micro-credits per million work units")
    name = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
    gpu = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
    gpu_memory_mb = StrictIntegerField(min_value=0, max_value=MAX_GPU_MEMORY_MB, required=False, default=0)
    region = serializers.CharField(max_length=32, required=False, default="", allow_blank=True)


class OfferInput(serializers.Serializer):
    model = serializers.CharField(max_length=128, required=False)
    block_start = StrictIntegerField(required=False, **_BLOCK)
    block_end = StrictIntegerField(required=False, **_BLOCK)
    price = StrictIntegerField(min_value=0, max_value=MAX_PRICE, required=False)


class HeartbeatInput(serializers.Serializer):
    state = serializers.ChoiceField(choices=[(s, s) for s in HEARTBEAT_STATES])
    throughput = StrictFloatField(required=False, allow_null=True, default=None)
    latency_ms = StrictFloatField(required=False, allow_null=True, default=None, max_value=1e9)


class MeasurementInput(serializers.Serializer):
    throughput = StrictFloatField()
    latency_ms = StrictFloatField(max_value=1e9)
    success_rate = StrictFloatField(max_value=1.0)
    samples = StrictIntegerField(min_value=1, max_value=10**9, required=False, default=1)
    measured_at = serializers.DateTimeField(required=False, default=None)


class SuspendInput(serializers.Serializer):
    reason = serializers.CharField(max_length=200)


def _offer_from(data: dict, base: Provider | None = None) -> OfferSpec:
    model = catalog_model_for_use(model_id=data["model"]) if "model" in data else base.model
    return OfferSpec(
        model=model,
        block_start=data.get("block_start", base.block_start if base else None),
        block_end=data.get("block_end", base.block_end if base else None),
        price=data.get("price", base.price if base else None),
    )


def _own(request: Request, provider_id: int) -> Provider:
    """A provider the caller may act for: its owner's, or any for staff (others get a 404,
    which does not reveal whether the id exists)."""
    return provider_get(user=request.user, provider_id=provider_id)


class ChallengeView(APIView):
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "challenge"

    @extend_schema(request=None, responses={201: ChallengeOutput})
    def post(self, request: Request) -> Response:
        challenge = challenge_issue(user=request.user)
        return Response(
            {
                "challenge": challenge.nonce,
                "expires_at": challenge.expires_at,
                "message_prefix": REGISTRATION_PREFIX.decode(),
            },
            status=status.HTTP_201_CREATED,
        )


class ProviderListRegister(ListAPIView):
    """Your providers (staff: all). POST registers one (201) or re-registers it (200)."""

    serializer_class = ProviderOutput

    def get_queryset(self) -> QuerySet[Provider]:
        return providers_visible_to(user=self.request.user)

    @extend_schema(request=RegisterInput, responses={201: ProviderOutput, 200: ProviderOutput})
    def post(self, request: Request) -> Response:
        data = parse(RegisterInput, request.data)
        offer = _offer_from(data)
        provider, created = provider_register(
            user=request.user,
            peer_id=data["peer_id"],
            public_key=data["public_key"],
            challenge=data["challenge"],
            signature=data["signature"],
            offer=offer,
            name=data["name"],
            gpu=data["gpu"],
            gpu_memory_mb=data["gpu_memory_mb"],
            region=data["region"],
        )
        return Response(
            ProviderOutput(provider).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class ProviderDetail(APIView):
    @extend_schema(responses=ProviderOutput)
    def get(self, request: Request, provider_id: int) -> Response:
        return Response(ProviderOutput(provider_get(user=request.user, provider_id=provider_id)).data)

    @extend_schema(request=OfferInput, responses=ProviderOutput, description="Change model, span or price.")
    def patch(self, request: Request, provider_id: int) -> Response:
        provider = _own(request, provider_id)
        provider = provider_offer_update(
            provider=provider, offer=_offer_from(parse(OfferInput, request.data), provider)
        )
        return Response(ProviderOutput(provider_get(user=request.user, provider_id=provider.pk)).data)


class HeartbeatView(APIView):
    @extend_schema(request=HeartbeatInput, responses=ProviderOutput)
    def post(self, request: Request, provider_id: int) -> Response:
        provider = provider_heartbeat(provider=_own(request, provider_id), **parse(HeartbeatInput, request.data))
        return Response(ProviderOutput(provider_get(user=request.user, provider_id=provider.pk)).data)


class MeasurementListRecord(ListAPIView):
    """Measurements of a provider, newest first. POST (staff, i.e. the scheduler) records one."""

    serializer_class = MeasurementOutput

    def get_queryset(self) -> QuerySet[ProviderMeasurement]:
        return provider_measurements(
            provider=provider_get(user=self.request.user, provider_id=self.kwargs["provider_id"])
        )

    @extend_schema(request=MeasurementInput, responses={201: MeasurementOutput})
    def post(self, request: Request, provider_id: int) -> Response:
        if not request.user.is_staff:
            raise PermissionDenied("only the scheduler (staff) records measurements")
        data = parse(MeasurementInput, request.data)
        measurement = provider_measurement_record(
            provider=provider_get(user=request.user, provider_id=provider_id), **data
        )
        return Response(MeasurementOutput(measurement).data, status=status.HTTP_201_CREATED)


class SuspendView(APIView):
    permission_classes = [IsStaff]

    @extend_schema(request=SuspendInput, responses=ProviderOutput)
    def post(self, request: Request, provider_id: int) -> Response:
        data = parse(SuspendInput, request.data)
        provider = provider_suspend(provider=provider_get(user=request.user, provider_id=provider_id), **data)
        return Response(ProviderOutput(provider).data)


class ReinstateView(APIView):
    permission_classes = [IsStaff]

    @extend_schema(request=None, responses=ProviderOutput)
    def post(self, request: Request, provider_id: int) -> Response:
        provider = provider_reinstate(provider=provider_get(user=request.user, provider_id=provider_id))
        return Response(ProviderOutput(provider).data)


class MarketProviderList(ListAPIView):
    """Every provider in the market with its public fields (``?model=`` filters, ``?online=1``
    keeps online, unsuspended ones), online first, then by price: what the web's providers
    page shows. Your own providers carry ``mine: true``; ``/api/providers/`` has their details."""

    serializer_class = PublicProviderOutput

    def get_queryset(self) -> QuerySet[Provider]:
        online = self.request.query_params.get("online", "") in ("1", "true", "yes")
        return providers_public(model_id=self.request.query_params.get("model") or None, online_only=online)

    def paginate_queryset(self, queryset: QuerySet[Provider]) -> list[Provider] | None:
        page = super().paginate_queryset(queryset)
        self._uptimes = provider_uptimes(page if page is not None else queryset, now=timezone.now())
        return page

    def get_serializer_context(self) -> dict:
        return {**super().get_serializer_context(), "uptimes": getattr(self, "_uptimes", {})}

    @extend_schema(
        parameters=[
            OpenApiParameter("model", str, description="only providers of this catalogued model"),
            OpenApiParameter("online", bool, description="only online, unsuspended providers"),
        ]
    )
    def get(self, request: Request, *args, **kwargs) -> Response:  # noqa: ANN002,ANN003
        return super().get(request, *args, **kwargs)


class MarketProviderDetail(APIView):
    @extend_schema(responses=PublicProviderOutput, description="Any provider's public fields.")
    def get(self, request: Request, provider_id: int) -> Response:
        provider = provider_public_get(provider_id=provider_id)
        uptimes = provider_uptimes([provider], now=timezone.now())
        return Response(PublicProviderOutput(provider, context={"request": request, "uptimes": uptimes}).data)


class OffersView(APIView):
    """Offers for a model: online, unsuspended providers, measured figures where they exist."""

    @extend_schema(responses=OfferOutput(many=True))
    def get(self, request: Request, model_id: str) -> Response:
        offers = offers_for_model(model=catalog_model_get(model_id=model_id))
        return Response(OfferOutput(offers, many=True).data)
