from django.urls import path

from marketplace.accounts import api

urlpatterns = [
    path("auth/signup/", api.SignupView.as_view(), name="signup"),
    path("me/", api.MeView.as_view(), name="me"),
    path("keys/", api.ApiKeyListCreate.as_view(), name="api-keys"),
    path("keys/<id:key_id>/", api.ApiKeyDetail.as_view(), name="api-key"),
]
