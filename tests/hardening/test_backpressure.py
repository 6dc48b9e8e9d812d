"""Backpressure and the HTTP edges through Ray's proxy: a burst beyond the admission limit is
refused at once (503, Retry-After, the JSON error body), a request id on every answer, a 5xx
body that says nothing but a generic message and that id, a chunked body cut off at the limit.

An app of its own (``/pressure``) admitting 2 work requests at once.

Figures: ``pytest tests/hardening/test_backpressure.py -s`` prints the rejection latencies.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve

APP = "pressure"
PROMPT = "a red circle on a blue background"
ADMITTED = 2
RETRY_AFTER_S = 3
LEAKS = ("Traceback", "site-packages", "File \"", "pid=", "ip=", "RayTaskError", "ActorDiedError",
         "/work/", "/tmp/", "127.0.0.1")


def assert_generic_5xx(response: httpx.Response) -> None:
    """A 5xx as every 5xx must be: JSON, Retry-After on a 503, the answer's request id in the
    body, and nothing of the server's insides (no traceback, path, process or address)."""
    assert response.status_code >= 500
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert error["request_id"] == response.headers["x-request-id"]
    if response.status_code == 503:
        assert int(response.headers["retry-after"]) > 0
    for leak in LEAKS:
        assert leak not in response.text, (leak, response.text)


@pytest.fixture(scope="module")
def url(deploy_app) -> str:
    yield deploy_app(APP, "/pressure", backpressure={"max_requests_in_flight": ADMITTED,
                                                     "retry_after_s": RETRY_AFTER_S})
    serve.delete(APP)


def timed_post(url: str, body: dict) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=120.0)
    return response, time.monotonic() - start


def test_a_burst_beyond_the_limit_is_refused_at_once_in_json(url):
    bodies = [{"prompt": PROMPT, "seed": i, "steps": 40} for i in range(24)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        outcomes = list(pool.map(lambda body: timed_post(url, body), bodies))
    refused = [(r, s) for r, s in outcomes if r.status_code != 200]
    served = [r for r, _ in outcomes if r.status_code == 200]
    latencies = sorted(seconds for _, seconds in refused)
    print(f"\n{len(served)} served, {len(refused)} refused; rejection latency median "
          f"{statistics.median(latencies):.3f} s, max {latencies[-1]:.3f} s")
    assert len(served) >= ADMITTED and len(refused) >= 24 - 3 * ADMITTED
    for response, seconds in refused:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        assert response.json()["error"]["code"] == "overloaded"
        assert_generic_5xx(response)
        assert seconds < 2.0
    # the limit is on what is in progress: once the burst is over, requests are served again
    assert httpx.post(f"{url}/v1/generate", json=bodies[0], timeout=120.0).status_code == 200


def test_every_answer_has_a_request_id_and_a_clients_sane_one_is_kept(url):
    response = httpx.get(f"{url}/v1/models")
    assert len(response.headers["x-request-id"]) >= 16
    mine = "client-trace-0af7651916cd43dd8448eb211c80319c"
    response = httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "steps": 99},
                          headers={"x-request-id": mine})
    assert response.status_code == 422
    assert response.headers["x-request-id"] == mine == response.json()["error"]["request_id"]
    response = httpx.get(f"{url}/v1/models", headers={"x-request-id": "two words"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "x-request-id"


def test_a_chunked_body_over_the_limit_gets_a_json_413(url):
    def chunks():
        for _ in range(20):  # 20 x 64 KiB without Content-Length: 1.25 MiB, the limit ~1.17 MiB
            yield b" " * 65536

    response = httpx.post(f"{url}/v1/generate", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=60.0)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "body"
    assert "content-length" not in response.request.headers  # it was sent chunked
