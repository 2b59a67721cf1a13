from django.apps import AppConfig


class WebConfig(AppConfig):
    """Server-rendered pages: the public marketplace, the client's wallet, jobs and keys, staff views."""

    name = "marketplace.web"
    label = "web"
    verbose_name = "web pages"
