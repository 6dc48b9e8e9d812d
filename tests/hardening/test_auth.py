"""API keys and CORS through Ray and real HTTP: an app with keys at ``/keyed`` on the package's
cluster, called as OpenAI clients (Bearer) and A1111 clients (Open WebUI's HTTP Basic) call it.

Every request here comes from 127.0.0.1, so this app leaves ``allow_loopback`` off (its default):
loopback requests need a key like any other (the exemption itself: tests/unit/test_auth.py).
"""
from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest
import ray

from tests.observability.prom import Scrape, poll

KEY = "hardening-test-key-0123456789abcdef"
SECOND_KEY = "hardening-second-key-abcdefghijkl"
ORIGIN = "https://webui.example.com"
PROMPT = "a red circle on a blue background"
CHALLENGES = ['Bearer realm="raydiance"', 'Basic realm="raydiance", charset="UTF-8"']


@pytest.fixture(scope="module")
def keyed(deploy_app, tmp_path_factory) -> str:
    keys = tmp_path_factory.mktemp("auth") / "api_keys"
    keys.write_text(f"# test keys\n{KEY}\n{SECOND_KEY}  # a second client\n")
    return deploy_app("keyed", "/keyed", auth={"keys_file": str(keys)},
                      cors={"allow_origins": [ORIGIN]})


@pytest.fixture(scope="module")
def http(keyed) -> httpx.Client:
    with httpx.Client(base_url=keyed, timeout=120.0) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(user: str, key: str) -> dict[str, str]:
    """As Open WebUI sends its AUTOMATIC1111_API_AUTH ``user:password``."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers.get_list("www-authenticate") == CHALLENGES
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["param"] == "authorization" and error["code"] == code
    assert KEY not in response.text


def metrics_url() -> str:
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def test_failures_counted_by_reason_and_401s_among_the_requests(http):
    """First in the module: no other request has failed on this app yet, so nothing earlier can
    be exported late into this test's window."""
    url = metrics_url()
    before = Scrape.parse(httpx.get(url, timeout=10).text)
    sent = {"missing": 1, "wrong": 2, "malformed": 1}
    http.get("/v1/models")
    http.get("/v1/models", headers=bearer("wrong-key-0123456789abcdef"))
    http.get("/v1/models", headers=basic("u", "wrong-key-0123456789abcdef"))
    http.get("/v1/models", headers={"Authorization": "Digest x"})

    def rise(now: Scrape, name: str, **labels: str) -> float:
        return now.total(name, **labels) - before.total(name, **labels)

    def counted() -> Scrape | None:
        now = Scrape.parse(httpx.get(url, timeout=10).text)
        done = rise(now, "ray_raydiance_auth_failures_total") >= sum(sent.values()) and \
            rise(now, "ray_raydiance_requests_total", status="401", application="keyed") >= 4
        return now if done else None

    now = poll(counted, 60, "auth failures exported", interval_s=1.0)
    for reason, count in sent.items():
        assert rise(now, "ray_raydiance_auth_failures_total", reason=reason,
                    application="keyed") == count, reason
    # answered before routing, yet counted under the route they asked for, not "unmatched"
    assert rise(now, "ray_raydiance_requests_total", method="GET", status="401",
                endpoint="/v1/models", application="keyed") == 4


def test_no_key_a_wrong_key_and_malformed_credentials_get_401(http):
    assert_refused(http.get("/v1/models"), "missing_api_key")
    assert_refused(http.post("/v1/generate", json={"prompt": PROMPT}), "missing_api_key")
    assert_refused(http.get("/v1/models", headers=bearer(KEY + "x")), "invalid_api_key")
    assert_refused(http.get("/v1/models", headers=basic("webui", SECOND_KEY[:-1])),
                   "invalid_api_key")
    assert_refused(http.get("/v1/models", headers={"Authorization": KEY}), "invalid_authorization")


def test_a_right_key_as_bearer_and_as_basic(http):
    for headers in (bearer(KEY), bearer(SECOND_KEY), basic("anyone", KEY), basic("", SECOND_KEY)):
        response = http.get("/v1/models", headers=headers)
        assert response.status_code == 200, (headers, response.text)
    png = http.post("/v1/generate", headers=bearer(KEY),
                    json={"prompt": PROMPT, "width": 64, "height": 64, "steps": 2, "seed": 1})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_health_and_the_api_description_need_no_key(http):
    assert http.get("/healthz").json()["status"] == "ok"
    assert "/v1/images/generations" in http.get("/openapi.json").json()["paths"]
    assert http.get("/docs").status_code == 200


def test_openai_client_with_the_right_and_a_wrong_key(keyed):
    right = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0, timeout=120)
    result = right.images.generate(prompt=PROMPT, size="64x64", response_format="b64_json",
                                   extra_body={"steps": 2})
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")
    wrong = openai.OpenAI(base_url=f"{keyed}/v1", api_key="not-the-key-0123456789abcdef",
                          max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.images.generate(prompt=PROMPT, size="64x64")
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"


def test_a1111_flow_with_basic_auth_as_open_webui_sends_it(keyed):
    with httpx.Client(base_url=keyed, timeout=120.0, headers=basic("webui", KEY)) as webui:
        assert webui.get("/sdapi/v1/options").status_code == 200  # "verify connection"
        models = webui.get("/sdapi/v1/sd-models").json()
        assert models[0]["title"] == "tiny-shapes"
        response = webui.post("/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "width": 64, "height": 64, "steps": 2, "batch_size": 1,
            "override_settings": {"sd_model_checkpoint": models[0]["title"]}})
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["images"][0]).startswith(b"\x89PNG")
        assert json.loads(response.json()["info"])["sd_model_name"] == "tiny-shapes"
    with httpx.Client(base_url=keyed, timeout=120.0) as anonymous:
        assert_refused(anonymous.get("/sdapi/v1/sd-models"), "missing_api_key")


def test_cors_preflight_from_an_allowed_origin_only(http):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = http.options("/v1/images/generations", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200  # no key: browsers never send one on a preflight
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
    other = http.options("/v1/images/generations",
                         headers={"Origin": "https://elsewhere.example.com", **preflight})
    assert "access-control-allow-origin" not in other.headers
    answered = http.get("/v1/models", headers={"Origin": ORIGIN, **bearer(KEY)})
    assert answered.headers["access-control-allow-origin"] == ORIGIN
    refused = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
