"""The Ingress's two ASGI middlewares: every request counted and timed, an oversized body refused.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware turns a request
cancelled because its client left into ``RuntimeError("No response returned.")`` (a 500 where it
is a 499), and could not see a streamed answer's real status or time it to its last byte.
"""
from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.api.errors import error_response
from deployments.metrics import record_request

CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


class BodyLimitMiddleware:
    """A 413 in the JSON error shape for a declared body over the limit (FastAPI's own
    max_body_size answers in plain text)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                response = error_response(413, "body", f"{length} bytes; the limit is "
                                          f"{self.max_body_bytes}", "too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _endpoint(scope: Scope) -> str:
    """The matched route's template (``/v1/generate``), never the raw path: bounded label values."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class HttpMetricsMiddleware:
    """``raydiance_requests`` and its latency, by endpoint, method and status (499: the client
    left before an answer began). Reads the matched route from the scope, where Starlette's
    router writes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException as error:
            if status is None:  # no answer started: the client left (cancelled) or a crash (500)
                status = 500 if isinstance(error, Exception) else CLIENT_CLOSED
            raise
        finally:
            record_request(_endpoint(scope), scope.get("method", ""), status or 500,
                           time.perf_counter() - start)


def install_middleware(app: FastAPI, max_body_bytes: int) -> None:
    """The body limit inside, the metrics around it: every answer is counted, a 413 too."""
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware)
