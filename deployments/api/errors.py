"""Every error as JSON that names the field, with the status its route's clients expect.

One body shape serves all three APIs: OpenAI clients read ``error.message``, FastAPI and A1111
clients read ``detail``. The OpenAI route answers a bad value with 400 (what OpenAI does and what
its client maps to BadRequestError); the native and A1111 routes with 422, as FastAPI does.
Every body carries the request's id (``error.request_id``, the ``x-request-id`` of the answer);
a 5xx body says what failed in general terms only, and that id: the traceback goes to the log
under the same id. 429 and 503 say when to retry (``Retry-After``).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pipeline.errors import InvalidRequestError, ModelLoadError, NotFoundError

OPENAI_PREFIX = "/v1/images/"
DEFAULT_RETRY_AFTER_S = 5
REQUEST_ID: ContextVar[str | None] = ContextVar("raydiance_request_id", default=None)
"""The id of the request being answered (set by ``middleware.RequestIdMiddleware``)."""


def current_request_id() -> str | None:
    return REQUEST_ID.get()


class ApiError(Exception):
    """A caller's mistake: ``field`` in the caller's own vocabulary, a status if not the route's
    default (400 for the OpenAI route, 422 elsewhere)."""

    def __init__(self, field: str, message: str, status: int | None = None,
                 code: str = "invalid_value") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status, self.code = field, message, status, code

    def renamed(self, names: Mapping[str, str]) -> ApiError:
        """This error with its field's first part in the caller's terms (``cache.end`` becomes
        ``override_settings.cache.end`` where ``names["cache"]`` says so)."""
        head, dot, rest = self.field.partition(".")
        return ApiError(names.get(head, head) + dot + rest, self.message, self.status, self.code)


def caller_mistake(error: BaseException) -> ApiError | None:
    """A pipeline error about the request as an ``ApiError`` (404 for a name that does not
    exist; 4xx naming ``model`` for a model whose files cannot be used, wherever that is found:
    retrying will not help, another model will), or None when ``error`` is no such thing."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ModelLoadError):  # pickled weights (UnsafeWeightsError) included
        return ApiError("model", error.message, code="model_unusable")
    if isinstance(error, NotFoundError):  # OpenAI's code for an unknown model; ours for a LoRA
        code = {"model": "model_not_found", "loras": "lora_not_found"}.get(error.field, "not_found")
        return ApiError(error.field, error.message, status=404, code=code)
    if isinstance(error, InvalidRequestError):
        return ApiError(error.field, error.message)
    return None


@contextmanager
def in_callers_terms(names: Mapping[str, str]) -> Iterator[None]:
    """Turns the request errors raised inside into ``ApiError``s naming the caller's fields:
    ``names`` maps the neutral names (``count``) to the dialect's (``n``)."""
    try:
        yield
    except (ApiError, InvalidRequestError, ModelLoadError) as error:
        raise caller_mistake(error).renamed(names) from None  # type: ignore[union-attr]


def error_body(status: int, field: str | None, message: str, code: str) -> dict:
    text = f"{field}: {message}" if field else message
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": text, "type": kind, "param": field, "code": code}
    request_id = REQUEST_ID.get()
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error, "detail": text}


def internal_error_body() -> dict:
    """A bug's answer: no detail at all, only the id under which the log has the traceback."""
    message = f"internal error (request id {REQUEST_ID.get() or 'unknown'}); see the server log"
    return error_body(500, None, message, "internal_error")


def error_response(status: int, field: str | None, message: str, code: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, field, message, code), status_code=status, headers=headers)


def api_error_response(error: ApiError, request: Request,
                       retry_after_s: int = DEFAULT_RETRY_AFTER_S) -> JSONResponse:
    """The answer to ``error`` on ``request``'s route; 429 and 503 say when to retry."""
    status = error.status or default_status(request)
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    return error_response(status, error.field, error.message, error.code, headers)


def default_status(request: Request) -> int:
    """400 on the OpenAI route, 422 elsewhere; the path read below the app's route prefix."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return 400 if path.startswith(OPENAI_PREFIX) else 422


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    invalid_json = first.get("type") == "json_invalid"
    field = ".".join(loc) if loc and not invalid_json else "body"
    message = "not valid JSON" if invalid_json else first.get("msg", "invalid value")
    return error_response(default_status(request), field, message,
                          first.get("type", "invalid"))


async def _http(request: Request, error: HTTPException) -> JSONResponse:
    # FastAPI's own refusals (unknown route, wrong method, a body it cannot parse or that is too
    # large) in the same shape; the last two are about the body.
    about_body = error.status_code in (400, 413)
    code = {400: "invalid_body", 413: "too_large"}.get(error.status_code, f"http_{error.status_code}")
    return error_response(error.status_code, "body" if about_body else None, str(error.detail),
                          code, dict(error.headers or {}))


def install_error_handlers(app: FastAPI, retry_after_s: int = DEFAULT_RETRY_AFTER_S) -> None:
    """The caller's mistakes and FastAPI's refusals as JSON. A bug's 500 is answered by
    ``middleware.ErrorBoundaryMiddleware``, which knows the request's id."""

    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return api_error_response(error, request, retry_after_s)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
