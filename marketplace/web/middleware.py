"""Content-Security-Policy on every response (Django 5.2 has no built-in one)."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse


class ContentSecurityPolicyMiddleware:
    """Sets ``HIVEMART_CSP`` (``HIVEMART_CSP_DOCS`` under the API docs' paths) unless the view set
    its own. The pages load scripts, styles and images from this site only and run no inline
    script, so injected markup cannot run code or send data elsewhere."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if "Content-Security-Policy" not in response:
            docs = request.path.startswith(settings.HIVEMART_CSP_DOCS_PATHS)
            response["Content-Security-Policy"] = settings.HIVEMART_CSP_DOCS if docs else settings.HIVEMART_CSP
        return response
