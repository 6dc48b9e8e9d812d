"""Every error as JSON that names the field, with the status its route's clients expect.

One body shape serves all three APIs: OpenAI clients read ``error.message``, FastAPI and A1111
clients read ``detail``. The OpenAI route answers a bad value with 400 (what OpenAI does and what
its client maps to BadRequestError); the native and A1111 routes with 422, as FastAPI does.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from deployments.api_models import ApiError

logger = logging.getLogger("ray.serve")
OPENAI_PREFIX = "/v1/images/"


def error_body(status: int, field: str | None, message: str, code: str) -> dict:
    text = f"{field}: {message}" if field else message
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": text, "type": kind, "param": field, "code": code}, "detail": text}


def error_response(status: int, field: str | None, message: str, code: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, field, message, code), status_code=status, headers=headers)


def _default_status(request: Request) -> int:
    return 400 if request.url.path.startswith(OPENAI_PREFIX) else 422


class BodyLimitMiddleware:
    """A 413 in the JSON error shape for a declared body over the limit (FastAPI's own
    max_body_size answers in plain text).

    Plain ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware turns a request
    cancelled because its client left into ``RuntimeError("No response returned.")``, which the
    metrics middleware around it would count as a 500 instead of a 499.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                response = error_response(413, "body", f"{length} bytes; the limit is "
                                          f"{self.max_body_bytes}", "too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        status = error.status or _default_status(request)
        headers = {"Retry-After": "5"} if status in (429, 503) else None
        return error_response(status, error.field, error.message, error.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:]
        field = ".".join(loc) if loc and first.get("type") != "json_invalid" else "body"
        message = first.get("msg", "invalid value")
        if first.get("type") == "json_invalid":
            message = "not valid JSON"
        return error_response(_default_status(request), field, message, first.get("type", "invalid"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        # FastAPI's own refusals (unknown route, wrong method, body too large) in the same shape.
        field = "body" if error.status_code == 413 else None
        return error_response(error.status_code, field, str(error.detail), f"http_{error.status_code}",
                              dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, None, f"internal error: {type(error).__name__}: {error}", "internal_error")
