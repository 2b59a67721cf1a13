from django.urls import path

from marketplace.payments import api

urlpatterns = [
    path("payments/topups/", api.TopUpList.as_view(), name="payments-topups"),
    path("payments/topups/<id:topup_id>/", api.TopUpDetail.as_view(), name="payments-topup"),
    path("payments/topups/<id:topup_id>/test-pay/", api.TopUpTestPay.as_view(), name="payments-topup-test-pay"),
    path("payments/stripe/webhook/", api.StripeWebhook.as_view(), name="payments-stripe-webhook"),
    path("payouts/", api.PayoutList.as_view(), name="payouts"),
    path("payouts/<id:request_id>/", api.PayoutDetail.as_view(), name="payout"),
    path("payouts/<id:request_id>/approve/", api.PayoutApprove.as_view(), name="payout-approve"),
    path("payouts/<id:request_id>/reject/", api.PayoutReject.as_view(), name="payout-reject"),
    path("payouts/<id:request_id>/paid/", api.PayoutPaid.as_view(), name="payout-paid"),
]
