"""The web pages, mounted at the site's root (the API lives under /api/, the admin under /admin/)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from marketplace.web import views

app_name = "web"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("providers/", views.providers, name="providers"),
    path("providers/<id:provider_id>/", views.provider_detail, name="provider"),
    path("sell/", views.sell, name="sell"),
    path("wallet/", views.wallet, name="wallet"),
    path("wallet/topups/", views.topup, name="topup"),
    path("wallet/topups/<id:topup_id>/pay/", views.topup_test_pay, name="topup-test-pay"),
    path("wallet/payouts/", views.payout_request, name="payout-request"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/<id:job_id>/", views.job_detail, name="job"),
    path("keys/", views.keys, name="keys"),
    path("keys/<id:key_id>/revoke/", views.key_revoke, name="key-revoke"),
    path("staff/audits/", views.audits, name="audits"),
    path("staff/payouts/", views.staff_payouts, name="staff-payouts"),
    path("staff/payouts/<id:request_id>/<str:action>/", views.staff_payout_decide, name="staff-payout-decide"),
    path("signup/", views.signup, name="signup"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", views.healthz, name="healthz"),
]
