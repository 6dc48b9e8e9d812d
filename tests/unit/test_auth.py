"""API keys and CORS in-process: the settings' checks, the key file's reload, and the ASGI gate
over a small FastAPI app (client addresses chosen freely: loopback and not). Through Ray and
real HTTP: tests/hardening/test_auth.py."""
from __future__ import annotations

import asyncio
import base64
import os

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from deployments.api import auth as auth_module
from deployments.api.auth import CorsSettings, install_access_control, presented_key
from deployments.api.errors import install_error_handlers
from deployments.api.keys import AuthSettings, KeyRing, parse_keys
from starlette.datastructures import Headers

KEY = "k3y-for-the-unit-tests-0123456789"
OTHER = "another-valid-key-abcdefghijklmnop"
ORIGIN = "https://webui.example.com"


def basic(password: str, user: str = "anyone") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(f"# who holds which key\n{KEY}  # alice\n\n{OTHER}\n")
    return path


def make_app(auth: AuthSettings | None, cors: CorsSettings = CorsSettings()) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    @app.post("/v1/generate")
    async def generate():
        return {"ok": True}

    install_error_handlers(app)
    install_access_control(app, auth, cors)
    return app


def client(app: FastAPI, host: str = "203.0.113.7", root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40000), root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url=f"http://testserver{root_path}")


def fetch(app: FastAPI, method: str, path: str, host: str = "203.0.113.7", root_path: str = "",
          **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with client(app, host, root_path) as http:
            return await http.request(method, path, **kwargs)
    return asyncio.run(go())


@pytest.fixture
def failures(monkeypatch) -> list[str]:
    """The reasons the gate records (what it hands to deployments.metrics)."""
    seen: list[str] = []
    monkeypatch.setattr(auth_module, "record_auth_failure", seen.append)
    return seen


# --- settings ------------------------------------------------------------------------------------

def test_keys_file_parsed_with_comments_and_separators():
    assert parse_keys(f"{KEY}, {OTHER} # two on a line\n# only a comment\n", "src") == [KEY, OTHER]


@pytest.mark.parametrize("kwargs, says", [
    ({}, "name keys_file"),
    ({"keys_file": "relative/keys"}, "not an absolute path"),
    ({"keys_file": "/nonexistent/raydiance/keys"}, "cannot be read"),
    ({"keys_env": "RAYDIANCE_TEST_UNSET_VARIABLE"}, "is not set"),
    ({"extra": 1}, "Extra inputs"),
])
def test_a_misconfiguration_fails_with_a_clear_message(kwargs, says):
    os.environ.pop("RAYDIANCE_TEST_UNSET_VARIABLE", None)
    with pytest.raises(ValidationError, match=says):
        AuthSettings(**kwargs)


@pytest.mark.parametrize("text, says", [
    ("", "holds no keys"),
    ("# nothing but comments\n\n", "holds no keys"),
    ("short\n", "line 1: a key must be at least 16"),
    (f"{KEY}\nkey-with-a-bad-char-é-0123456789\n", "line 2"),
])
def test_an_unusable_key_file_fails_the_settings_without_showing_keys(tmp_path, text, says):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValidationError, match=says) as raised:
        AuthSettings(keys_file=str(path))
    assert KEY not in str(raised.value)


def test_keys_from_an_environment_variable(monkeypatch):
    monkeypatch.setenv("RAYDIANCE_TEST_KEYS", f"{KEY},{OTHER}")
    ring = KeyRing(AuthSettings(keys_env="RAYDIANCE_TEST_KEYS"))
    assert ring.accepts(KEY.encode()) and ring.accepts(OTHER.encode())
    assert not ring.accepts(b"not-a-key") and not ring.accepts(KEY.encode()[:-1])
    monkeypatch.setenv("RAYDIANCE_TEST_KEYS", "  ")
    with pytest.raises(ValidationError, match="holds no keys"):
        AuthSettings(keys_env="RAYDIANCE_TEST_KEYS")


def test_the_key_file_reloads_when_it_changes_and_a_broken_one_keeps_the_keys(keys_file):
    ring = KeyRing(AuthSettings(keys_file=str(keys_file)))
    assert not ring.reload()  # unchanged
    new = "a-brand-new-key-0123456789abcdef"
    keys_file.write_text(new + "\n")
    assert ring.reload()
    assert ring.accepts(new.encode()) and not ring.accepts(KEY.encode())  # revoked
    keys_file.write_text("")  # emptied (or half-written): the previous keys stay
    assert not ring.reload() and ring.accepts(new.encode())
    keys_file.unlink()
    assert not ring.reload() and ring.accepts(new.encode())


@pytest.mark.parametrize("origin", ["https://x.example.com/", "x.example.com", "ftp://x", "https://"])
def test_cors_origins_must_be_origins(origin):
    with pytest.raises(ValidationError, match="is not an origin"):
        CorsSettings(allow_origins=[origin])


# --- credentials ---------------------------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    (None, "missing"),
    (f"Bearer {KEY}", KEY.encode()),
    (f"bearer   {KEY} ", KEY.encode()),
    (basic(KEY), KEY.encode()),
    (basic(KEY, user=""), KEY.encode()),
    (basic(f"{KEY}:with:colons"), f"{KEY}:with:colons".encode()),
    ("Bearer", "malformed"),
    (f"Token {KEY}", "malformed"),
    ("Basic not*base64", "malformed"),
    ("Basic " + base64.b64encode(b"no-colon").decode(), "malformed"),
])
def test_presented_key(header, expected):
    headers = Headers(headers={"authorization": header} if header else {})
    assert presented_key(headers) == expected


# --- the gate ------------------------------------------------------------------------------------

def test_right_keys_pass_and_the_rest_get_401_with_challenges(keys_file, failures):
    app = make_app(AuthSettings(keys_file=str(keys_file)))
    for header in (f"Bearer {KEY}", basic(OTHER)):
        assert fetch(app, "GET", "/v1/models", headers={"authorization": header}).status_code == 200
    cases = {"missing": {}, "wrong": {"authorization": f"Bearer {KEY}x"},
             "malformed": {"authorization": "Digest abc"}}
    for reason, headers in cases.items():
        response = fetch(app, "POST", "/v1/generate", headers=headers, json={})
        assert response.status_code == 401
        assert response.headers.get_list("www-authenticate") == [
            'Bearer realm="raydiance"', 'Basic realm="raydiance", charset="UTF-8"']
        body = response.json()
        assert body["error"]["param"] == "authorization" and body["detail"].startswith("authorization:")
        assert KEY not in response.text
    assert failures == ["missing", "wrong", "malformed"]


def test_health_and_the_api_description_are_open(keys_file, failures):
    app = make_app(AuthSettings(keys_file=str(keys_file)))
    for path in ("/healthz", "/openapi.json", "/docs"):
        assert fetch(app, "GET", path).status_code == 200, path
    assert fetch(app, "GET", "/healthz/").status_code == 401  # exact paths only
    assert failures == ["missing"]


def test_the_schema_declares_both_schemes_and_the_open_routes(keys_file):
    schema = fetch(make_app(AuthSettings(keys_file=str(keys_file))), "GET", "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["components"]["securitySchemes"]["basic"]["scheme"] == "basic"
    assert schema["security"] == [{"bearer": []}, {"basic": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/v1/models"]["get"]
    assert "401" in schema["paths"]["/v1/generate"]["post"]["responses"]
    assert "401" not in schema["paths"]["/healthz"]["get"]["responses"]
    assert "ErrorBody" in schema["components"]["schemas"]
    assert "security" not in fetch(make_app(None), "GET", "/openapi.json").json()


def test_paths_below_a_route_prefix(keys_file):
    app = make_app(AuthSettings(keys_file=str(keys_file)))
    assert fetch(app, "GET", "/healthz", root_path="/keyed").status_code == 200
    assert fetch(app, "GET", "/v1/models", root_path="/keyed").status_code == 401


def test_loopback_without_credentials_only_when_allowed(keys_file, failures):
    closed, loopback = (make_app(AuthSettings(keys_file=str(keys_file), allow_loopback=allow))
                        for allow in (False, True))
    assert fetch(closed, "GET", "/v1/models", host="127.0.0.1").status_code == 401
    assert fetch(loopback, "GET", "/v1/models", host="127.0.0.1").status_code == 200
    assert fetch(loopback, "GET", "/v1/models", host="::1").status_code == 200
    assert fetch(loopback, "GET", "/v1/models", host="192.0.2.1").status_code == 401
    wrong = {"authorization": "Bearer wrong-key-wrong-key-wrong"}  # presented: always checked
    assert fetch(loopback, "GET", "/v1/models", host="127.0.0.1", headers=wrong).status_code == 401
    assert failures == ["missing", "missing", "wrong"]


def test_cors_preflight_needs_no_key_and_only_listed_origins_get_headers(keys_file):
    app = make_app(AuthSettings(keys_file=str(keys_file)), CorsSettings(allow_origins=[ORIGIN]))
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    allowed = fetch(app, "OPTIONS", "/v1/generate", headers={"origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = fetch(app, "OPTIONS", "/v1/generate",
                  headers={"origin": "https://evil.example.com", **preflight})
    assert "access-control-allow-origin" not in other.headers
    refused = fetch(app, "GET", "/v1/models", headers={"origin": ORIGIN})
    assert refused.status_code == 401  # a browser page can read why
    assert refused.headers["access-control-allow-origin"] == ORIGIN


def test_without_settings_nothing_is_installed():
    app = make_app(None)
    assert fetch(app, "GET", "/v1/models").status_code == 200
    response = fetch(app, "GET", "/v1/models", headers={"origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers
