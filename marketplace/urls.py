"""URL map. Each app exposes its API routes in ``<app>/api_urls.py``; add new ones to ``API_APPS``."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

API_APPS = ["accounts", "catalog", "providers", "jobs", "ledger", "scheduling", "receipts"]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    *[path("api/", include(f"marketplace.{app}.api_urls")) for app in API_APPS],
    # The web pages take the rest of the site (overview at /, /providers/, /wallet/, /healthz, ...).
    path("", include("marketplace.web.urls")),
]

handler400 = "marketplace.common.exceptions.bad_request"
handler404 = "marketplace.common.exceptions.not_found"
handler500 = "marketplace.common.exceptions.server_error"
