from django.urls import path

from marketplace.receipts import api

urlpatterns = [
    path("platform/", api.Platform.as_view(), name="platform"),
    path("jobs/<id:job_id>/tickets/", api.JobTickets.as_view(), name="job-tickets"),
    path("jobs/<id:job_id>/tickets/renew/", api.JobTicketsRenew.as_view(), name="job-tickets-renew"),
    path("jobs/<id:job_id>/finish/", api.JobFinish.as_view(), name="job-finish"),
    path("receipts/", api.Receipts.as_view(), name="receipts"),
    path("settlements/", api.Settlements.as_view(), name="settlements"),
    path("audits/", api.Audits.as_view(), name="audits"),
    path("audits/equivocation/", api.AuditEquivocation.as_view(), name="audit-equivocation"),
    path("audits/<id:audit_id>/", api.AuditDetail.as_view(), name="audit"),
    path("offences/", api.Offences.as_view(), name="offences"),
    path("jobs/<int:job_id>/disputes/", api.JobDisputes.as_view(), name="job-disputes"),
    path("disputes/", api.Disputes.as_view(), name="disputes"),
    path("disputes/<int:dispute_id>/verdict/", api.DisputeVerdict.as_view(), name="dispute-verdict"),
]
