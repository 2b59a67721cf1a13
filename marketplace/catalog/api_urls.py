from django.urls import path

from marketplace.catalog import api

urlpatterns = [
    path("models/", api.CatalogModelListCreate.as_view(), name="models"),
    path("models/<str:model_id>/", api.CatalogModelDetail.as_view(), name="model"),
]
