from django.urls import path

from marketplace.ledger import api

urlpatterns = [
    path("ledger/accounts/", api.AccountList.as_view(), name="ledger-accounts"),
    path("ledger/accounts/<id:account_id>/", api.AccountDetail.as_view(), name="ledger-account"),
    path("ledger/postings/", api.PostingList.as_view(), name="ledger-postings"),
    path("ledger/holds/", api.HoldList.as_view(), name="ledger-holds"),
    path("ledger/holds/<id:hold_id>/", api.HoldDetail.as_view(), name="ledger-hold"),
    path("ledger/grants/", api.GrantView.as_view(), name="ledger-grants"),
    path("ledger/payouts/", api.PayoutView.as_view(), name="ledger-payouts"),
]
