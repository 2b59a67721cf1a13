"""URL map. Each app exposes its API routes in ``<app>/api_urls.py``; add new ones to ``API_URLCONFS``.

The routes are named by module path, as ``INSTALLED_APPS`` names apps: the scheduler's app
(``scheduler.app``) sits above the marketplace and plugs its replanning and placement routes
in here without the marketplace importing it.
"""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerSplitView

API_URLCONFS = [
    *(
        f"marketplace.{app}.api_urls"
        for app in ("accounts", "catalog", "providers", "jobs", "ledger", "receipts", "payments")
    ),
    "scheduler.app.api_urls",
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # Swagger UI and ReDoc from drf-spectacular-sidecar's files (whitenoise serves them); the split
    # view loads its start-up script from a URL, so the page needs no inline script (CSP).
    path(
        "api/docs/",
        SpectacularSwaggerSplitView.as_view(url_name="api-schema", template_name="web/swagger_ui.html"),
        name="api-docs",
    ),
    path(
        "api/redoc/",
        SpectacularRedocView.as_view(url_name="api-schema", template_name="web/redoc.html"),
        name="api-redoc",
    ),
    *[path("api/", include(urlconf)) for urlconf in API_URLCONFS],
    # The web pages take the rest of the site (overview at /, /providers/, /wallet/, /healthz, ...).
    path("", include("marketplace.web.urls")),
]

handler400 = "marketplace.common.exceptions.bad_request"
handler404 = "marketplace.common.exceptions.not_found"
handler500 = "marketplace.common.exceptions.server_error"
