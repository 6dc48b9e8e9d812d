"""Every error as JSON that names the field, with the status its route's clients expect.

One body shape serves all three APIs: OpenAI clients read ``error.message``, FastAPI and A1111
clients read ``detail``. The OpenAI route answers a bad value with 400 (what OpenAI does and what
its client maps to BadRequestError); the native and A1111 routes with 422, as FastAPI does.
A 5xx body says what failed in general terms only: the traceback goes to the log.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pipeline.errors import InvalidRequestError, ModelLoadError, NotFoundError

logger = logging.getLogger("ray.serve")
OPENAI_PREFIX = "/v1/images/"


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
    exist), or None when ``error`` is not the caller's mistake."""
    if isinstance(error, ApiError):
        return error
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
    except (ApiError, InvalidRequestError) as error:
        raise caller_mistake(error).renamed(names) from None  # type: ignore[union-attr]
    except ModelLoadError as error:  # a served name whose files cannot be read
        raise ApiError("model", str(error), code="model_unusable").renamed(names) from None


def error_body(status: int, field: str | None, message: str, code: str) -> dict:
    text = f"{field}: {message}" if field else message
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": text, "type": kind, "param": field, "code": code}, "detail": text}


def error_response(status: int, field: str | None, message: str, code: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, field, message, code), status_code=status, headers=headers)


def api_error_response(error: ApiError, path: str) -> JSONResponse:
    """The answer to ``error`` on a route at ``path``; 429 and 503 say when to retry."""
    status = error.status or default_status(path)
    headers = {"Retry-After": "5"} if status in (429, 503) else None
    return error_response(status, error.field, error.message, error.code, headers)


def default_status(path: str) -> int:
    return 400 if path.startswith(OPENAI_PREFIX) else 422


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return api_error_response(error, request.url.path)


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    invalid_json = first.get("type") == "json_invalid"
    field = ".".join(loc) if loc and not invalid_json else "body"
    message = "not valid JSON" if invalid_json else first.get("msg", "invalid value")
    return error_response(default_status(request.url.path), field, message,
                          first.get("type", "invalid"))


async def _http(request: Request, error: HTTPException) -> JSONResponse:
    # FastAPI's own refusals (unknown route, wrong method, body too large) in the same shape.
    field = "body" if error.status_code == 413 else None
    return error_response(error.status_code, field, str(error.detail), f"http_{error.status_code}",
                          dict(error.headers or {}))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(500, None, f"internal error: {type(error).__name__}", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
