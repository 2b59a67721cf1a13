"""The API's view base classes: DRF's, with ``Idempotency-Key`` honoured on every POST.

Every API view subclasses ``APIView`` or ``ListAPIView`` from here, not from DRF (a test walks
the URL map to hold every POST route to it). The key is taken after authentication, permission
and throttle checks (refusals there are not recorded: they depend on who asks and when), and
the answer is recorded when the response is finalized; see ``marketplace.common.idempotency``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponseBase
from rest_framework import generics
from rest_framework import views as drf_views
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.common.idempotency import (
    Claim,
    Replay,
    idempotency_begin,
    idempotency_finish,
    idempotency_release,
    request_fingerprint,
    request_key,
)

logger = logging.getLogger(__name__)


# No docstrings on these classes: drf-spectacular would take them for every view's description.
# APIView: DRF's, on which a POST with an ``Idempotency-Key`` runs at most once per key and user.
class APIView(drf_views.APIView):
    _idempotency_claim: Claim | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if request.method != "POST":
            return
        key = request_key(request)  # checked for anonymous callers too: one rule for the header
        if key is None or not request.user.is_authenticated:
            return
        self._idempotency_claim = idempotency_begin(
            scope=f"user:{request.user.pk}", key=key, fingerprint=request_fingerprint(request)
        )

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, Replay):
            return exc.response()
        return super().handle_exception(exc)

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        claim, self._idempotency_claim = self._idempotency_claim, None
        if claim is not None:
            try:
                idempotency_finish(claim, response)
            except Exception:  # the answer stands; a retry waits out the lock and runs again
                logger.exception("could not record the answer to an idempotent request")
        return response

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            return super().dispatch(request, *args, **kwargs)
        finally:
            # Still held only when something escaped DRF's handling: free the key for a retry.
            claim, self._idempotency_claim = self._idempotency_claim, None
            if claim is not None:
                idempotency_release(claim)


# DRF's ListAPIView on the idempotent APIView above.
class ListAPIView(APIView, generics.ListAPIView):
    pass
