"""Who may call the API (optional keys) and which web pages may call it from a browser (CORS).

Keys (``auth:``; off when absent) are accepted as ``Authorization: Bearer <key>`` (OpenAI
clients) and as HTTP Basic whose password is the key, any user name (A1111 clients: Open WebUI
sends ``Authorization: Basic``). Anything else is a 401 in the API's JSON error shape with a
``WWW-Authenticate`` challenge for both schemes, counted in ``raydiance_auth_failures`` by
reason. Open without a key: ``/healthz`` (health checks) and the API's description
(``/openapi.json``, ``/docs``, ``/redoc``), which holds no model names, keys or data; the page
at ``/`` (static: it asks for the key and sends it with every call it makes); CORS preflights (browsers never send credentials on them).

Both are plain ASGI middleware (Starlette's BaseHTTPMiddleware breaks 499 accounting, see
``middleware.py``): inside the metrics and request-id layers (a 401 is counted and carries its
id), outside admission and the body limit (a request without a key takes no slot and has no
body read), CORS outside the key check (preflights pass, and a browser page can read a 401).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, NonNegativeInt, field_validator
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from deployments.api.errors import error_response
from deployments.api.keys import AuthSettings, KeyRing
from deployments.api.protocol import ErrorBody
from deployments.metrics import record_auth_failure

Failure = Literal["missing", "malformed", "wrong"]
CHALLENGES = ('Bearer realm="raydiance"', 'Basic realm="raydiance", charset="UTF-8"')
MESSAGES: dict[Failure, tuple[str, str]] = {
    "missing": ("an API key is required: send 'Authorization: Bearer <key>', or HTTP Basic "
                "with the key as the password", "missing_api_key"),
    "malformed": ("not a Bearer credential or HTTP Basic user:password", "invalid_authorization"),
    "wrong": ("the API key is not valid", "invalid_api_key"),
}


class CorsSettings(BaseModel):
    """``cors:`` in serve_config.yaml: the web origins whose pages may call the API from a
    browser (``https://host[:port]``, exactly as the browser sends it; ``*``: any site the user
    visits). Empty: no CORS headers, browsers keep other sites' pages out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_origins: list[str] = []
    max_age_s: NonNegativeInt = 600  # how long a browser may reuse a preflight's answer

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            scheme, sep, host = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not sep or not host
                                  or "/" in host):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], no path "
                                 "and no trailing slash (or '*')")
        return origins


def presented_key(headers: Headers) -> bytes | Failure:
    """The key a request presents, or why it presents none usable."""
    values = headers.getlist("authorization")
    if not values:
        return "missing"
    scheme, _, credential = values[0].strip().partition(" ")
    credential = credential.strip()
    if len(values) > 1 or not credential:
        return "malformed"
    if scheme.lower() == "bearer":
        return credential.encode("latin-1")
    if scheme.lower() != "basic":
        return "malformed"
    try:
        user_password = base64.b64decode(credential, validate=True)
    except (binascii.Error, ValueError):
        return "malformed"
    _, colon, password = user_password.partition(b":")
    return password if colon else "malformed"


def is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    try:
        return bool(client) and ipaddress.ip_address(client[0]).is_loopback
    except ValueError:  # a unix socket path or a test client's name
        return False


class ApiKeyMiddleware:
    """Lets a request through when it presents a configured key (or is exempt), else 401."""

    def __init__(self, app: ASGIApp, keys: KeyRing, open_paths: frozenset[str]) -> None:
        self.app, self.keys, self.open_paths = app, keys, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failure = self.check(scope) if scope["type"] in ("http", "websocket") else None
        if failure is None:
            await self.app(scope, receive, send)
            return
        record_auth_failure(failure)
        if scope["type"] == "websocket":
            await WebSocketClose(code=1008)(scope, receive, send)  # policy violation
            return
        message, code = MESSAGES[failure]
        response = error_response(401, "authorization", message, code)
        for challenge in CHALLENGES:
            response.headers.append("WWW-Authenticate", challenge)
        await response(scope, receive, send)

    def check(self, scope: Scope) -> Failure | None:
        """None when the request may go on, else why not."""
        if scope.get("method") == "OPTIONS" or _route_path(scope) in self.open_paths:
            return None
        self.keys.refresh_soon()
        key = presented_key(Headers(scope=scope))
        if key == "missing" and self.keys.settings.allow_loopback and is_loopback(scope):
            return None
        if isinstance(key, str):
            return key
        return None if self.keys.accepts(key) else "wrong"


def _route_path(scope: Scope) -> str:
    """The path below the app's route prefix (Serve sets ``root_path`` to it)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def open_paths(app: FastAPI) -> frozenset[str]:
    docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    # "/" is the page for people: static, no data; it asks for a key and sends it with each call
    return frozenset({"/", "/healthz", *(path for path in docs if path)})


UNAUTHORIZED = {"description": "No API key, a wrong one, or malformed credentials (WWW-Authenticate "
                               "says which schemes)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def _declare_error_body(schemas: dict[str, Any]) -> None:
    """The 401's body, where no route declared an error body of its own."""
    body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in body.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault("ErrorBody", body)


def document_security(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Declares both schemes in ``/openapi.json``, so that clients generated from it send the
    key and ``/docs`` offers its Authorize button; open routes declare no security."""
    unsecured = app.openapi

    def openapi() -> dict[str, Any]:
        schema = unsecured()  # FastAPI builds it once and caches it: this runs on a cached dict
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "basic": {"type": "http", "scheme": "basic",
                      "description": "any user name; the API key as the password"}}
        schema["security"] = [{"bearer": []}, {"basic": []}]
        _declare_error_body(schema["components"].setdefault("schemas", {}))
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if path in open_paths:
                    operation["security"] = []
                else:
                    operation.setdefault("responses", {})["401"] = UNAUTHORIZED
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_access_control(app: FastAPI, auth: AuthSettings | None, cors: CorsSettings) -> None:
    """Installs the key check (when ``auth`` is set; its keys read now, at replica start) and
    CORS (when origins are listed). Call after the guards and before the outer layers
    (``middleware.install_middleware``): Starlette wraps each added middleware around the last."""
    if auth is not None:
        unchecked = open_paths(app)
        app.add_middleware(ApiKeyMiddleware, keys=KeyRing(auth), open_paths=unchecked)
        document_security(app, unchecked)
    if cors.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors.allow_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-request-id"],
                           expose_headers=["*"], max_age=cors.max_age_s)
