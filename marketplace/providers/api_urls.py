from django.urls import path

from marketplace.providers import api

urlpatterns = [
    path("providers/", api.ProviderListRegister.as_view(), name="providers"),
    path("providers/challenge/", api.ChallengeView.as_view(), name="provider-challenge"),
    path("providers/<id:provider_id>/", api.ProviderDetail.as_view(), name="provider"),
    path("providers/<id:provider_id>/heartbeat/", api.HeartbeatView.as_view(), name="provider-heartbeat"),
    path("providers/<id:provider_id>/measurements/", api.MeasurementListRecord.as_view(), name="provider-measurements"),
    path("providers/<id:provider_id>/suspend/", api.SuspendView.as_view(), name="provider-suspend"),
    path("providers/<id:provider_id>/reinstate/", api.ReinstateView.as_view(), name="provider-reinstate"),
    path("market/providers/", api.MarketProviderList.as_view(), name="market-providers"),
    path("market/providers/<id:provider_id>/", api.MarketProviderDetail.as_view(), name="market-provider"),
    path("models/<str:model_id>/offers/", api.OffersView.as_view(), name="model-offers"),
]
