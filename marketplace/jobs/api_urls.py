from django.urls import path

from marketplace.jobs import api

urlpatterns = [
    path("jobs/", api.JobListCreate.as_view(), name="jobs"),
    path("jobs/<id:job_id>/", api.JobDetail.as_view(), name="job"),
    path("jobs/<id:job_id>/cancel/", api.JobCancel.as_view(), name="job-cancel"),
    path("jobs/<id:job_id>/transitions/", api.JobTransitions.as_view(), name="job-transitions"),
    path("jobs/<id:job_id>/plan/", api.JobPlan.as_view(), name="job-plan"),
]
