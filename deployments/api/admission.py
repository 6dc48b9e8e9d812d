"""Backpressure answered like the rest of the API: an admission limit in each Ingress replica.

Ray Serve can refuse requests itself (a deployment's ``max_queued_requests``), but its proxy
answers those in plain text, and without ``Retry-After`` unless the deployment's
``backpressure_config`` asks for it. So the Ingress counts the work requests (POST: the
generations, and A1111's options) it holds, and beyond ``max_requests_in_flight`` answers at
once: 503 (or 429) with ``Retry-After`` and the JSON error body, counted in
``raydiance_requests`` like every answer. The Ingress's own ``max_ongoing_requests`` must stay
above this limit, so that a request beyond it reaches the Ingress to be told, rather than
waiting in the proxy's queue; the proxy's refusals remain the last resort behind it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveInt
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.api.errors import DEFAULT_RETRY_AFTER_S, error_response


class BackpressureSettings(BaseModel):
    """``backpressure:`` in serve_config.yaml. ``retry_after_s`` is also what every other 503
    says (a timeout, a stage restarting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_requests_in_flight: PositiveInt = 64  # per Ingress replica
    status_code: Literal[429, 503] = 503
    retry_after_s: PositiveInt = DEFAULT_RETRY_AFTER_S  # whole seconds, as Retry-After says


class AdmissionMiddleware:
    """Lets a POST through while fewer than ``max_requests_in_flight`` are in progress here
    (streamed answers count until their last event); refuses it at once otherwise."""

    def __init__(self, app: ASGIApp, settings: BackpressureSettings) -> None:
        self.app, self.settings = app, settings
        self.in_flight = 0  # touched on the replica's event loop only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_requests_in_flight
        if self.in_flight >= limit:
            response = error_response(
                self.settings.status_code, "request", f"the server is at capacity ({limit} "
                f"requests in progress); retry after {self.settings.retry_after_s} s",
                "overloaded", {"Retry-After": str(self.settings.retry_after_s)})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
