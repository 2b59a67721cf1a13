from django.urls import path

from scheduler.app import api

urlpatterns = [
    path("jobs/<id:job_id>/replan/", api.JobReplan.as_view(), name="job-replan"),
    path("placement/", api.Placement.as_view(), name="placement"),
]
