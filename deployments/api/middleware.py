"""The Ingress's ASGI middlewares: a request id for every request, a bug answered as a generic 500
under that id, every request counted and timed, an oversized body refused.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware turns a request
cancelled because its client left into ``RuntimeError("No response returned.")`` (a 500 where it
is a 499), and could not see a streamed answer's real status or time it to its last byte.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.api.admission import AdmissionMiddleware, BackpressureSettings
from deployments.api.errors import REQUEST_ID, error_response, internal_error_body
from deployments.metrics import record_request

logger = logging.getLogger("ray.serve")
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"
REQUEST_ID_HEADER = "x-request-id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:/+=@-]{1,200}")
"""A client's own request id: a token (a UUID, a trace id), no spaces, quotes or separators."""


class RequestIdMiddleware:
    """Every request gets an id: its ``x-request-id`` if that is a sane token. Behind Ray Serve's
    proxy the header is always there (the proxy puts a UUID where the client sent none, echoes
    it on the answer and logs under it); without one (no proxy in front) a new UUID, put on the
    answer here. Log lines and error bodies carry it (``errors.REQUEST_ID``).

    A client id that is not a sane token is refused (400 naming ``x-request-id``) rather than
    replaced: Ray's proxy echoes the client's header on every answer and logs under it, so a
    replacement would give the answer two ids and the logs two names for one request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).getlist(REQUEST_ID_HEADER)
        if len(sent) > 1 or (sent and not SANE_REQUEST_ID.fullmatch(sent[0])):
            response = error_response(400, REQUEST_ID_HEADER, "must be one token of 1-200 "
                                      "letters, digits or ._~:/+=@- (or leave it out)",
                                      "invalid_request_id")
            await response(scope, receive, send)
            return
        request_id = sent[0] if sent else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send if sent else send_with_id)
        finally:
            REQUEST_ID.reset(token)


class ErrorBoundaryMiddleware:
    """A bug (an exception no handler answered) becomes a 500 that says only "internal error"
    and the request's id; the traceback goes to the log under that id. An exception after the
    answer began is logged and re-raised (the server then cuts the answer short)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            logger.exception("request %s: %s %s failed", REQUEST_ID.get(), scope.get("method"),
                             scope.get("path"))
            if started:
                raise
            await JSONResponse(internal_error_body(), status_code=500)(scope, receive, send)


class BodyLimitMiddleware:
    """A 413 in the JSON error shape for a body over the limit: at once for a declared length,
    and after at most the limit's bytes for one sent without (chunked): reading stops there."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            response = error_response(413, "body", f"{length} bytes; the limit is "
                                      f"{self.max_body_bytes}", "too_large")
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # FastAPI re-raises an HTTPException met while reading a body: its handler
                    # answers it in the JSON shape
                    raise HTTPException(413, f"over {self.max_body_bytes} bytes; the limit is "
                                        f"{self.max_body_bytes}")
            return message

        await self.app(scope, counted_receive, send)


def endpoint(scope: Scope, routes: list[BaseRoute]) -> str:
    """The route template a request matched (``/v1/generate``), never the raw path: bounded
    label values. A request answered before routing (401, 413, 503) is matched here."""
    route = scope.get("route")
    if route is None:  # included routers sit in ``routes`` as one entry: walk their routes
        route = next((r for r in iter_route_contexts(routes) if r.matches(scope)[0] is Match.FULL),
                     None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class HttpMetricsMiddleware:
    """``raydiance_requests`` and its latency, by endpoint, method and status (499: the client
    left before an answer began)."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app, self.routes = app, routes

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
            record_request(endpoint(scope, self.routes), scope.get("method", ""), status or 500,
                           time.perf_counter() - start)


def install_guards(app: FastAPI, max_body_bytes: int, backpressure: BackpressureSettings) -> None:
    """The innermost layers, added first: the admission limit around the body limit."""
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(AdmissionMiddleware, settings=backpressure)


def install_middleware(app: FastAPI) -> None:
    """The outermost layers, added last: the error boundary inside the request id (a 500 names
    it), the metrics around both (every answer is counted, a refusal too)."""
    app.add_middleware(ErrorBoundaryMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HttpMetricsMiddleware, routes=app.router.routes)
