"""Faults and errors in-process: errors that survive pickling, a batch whose bad request fails
alone, stage failures mapped to their answers, and the HTTP layers (request ids, the generic 500,
the body limit on the bytes received, admission) over a small FastAPI app. Through Ray and real
HTTP: tests/hardening/test_faults.py, test_errors_through_ray.py, test_backpressure.py."""
from __future__ import annotations

import asyncio
import logging
import pickle

import httpx
import pytest
from fastapi import FastAPI, Request
from ray import cloudpickle
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from deployments.api.admission import BackpressureSettings
from deployments.api.errors import ApiError, install_error_handlers
from deployments.api.faults import is_fault, translate
from deployments.api.middleware import install_guards, install_middleware
from deployments.batching import run_grouped
from pipeline.errors import (InvalidRequestError, MissingComponentError, ModelLoadError,
                             NotFoundError, UnsafeWeightsError)

ERRORS = [InvalidRequestError("loras", "x: not a LoRA"), NotFoundError("model", "no model 'y'"),
          ModelLoadError("z.safetensors: incomplete"), UnsafeWeightsError("z.ckpt: a pickle"),
          MissingComponentError("model 'm': vae not loaded")]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_every_error_survives_pickling_with_its_field_and_message(error, dumps):
    copy = pickle.loads(dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert copy.message == error.message
    assert getattr(copy, "field", None) == getattr(error, "field", None)


def in_ray_wrapper(error: BaseException) -> BaseException:
    """``error`` as the caller of a stage gets it: in a RayTaskError, as Ray pickles it."""
    wrapped = RayTaskError("encode", "Traceback ...", error).as_instanceof_cause()
    return pickle.loads(cloudpickle.dumps(wrapped))


def test_a_bad_item_fails_alone_and_its_group_mates_get_their_results():
    calls: list[list[str]] = []

    def run(group: list[str]) -> list[str]:
        calls.append(group)
        if "\ud800" in group:
            raise TypeError("the tokenizer refuses a lone surrogate")
        return [item.upper() for item in group]

    items = ["a", "b", "\ud800", "c", "x1", "x2"]
    results = run_grouped(items, key=lambda item: item.startswith("x"), run=run)
    assert results[:2] == ["A", "B"] and results[3:] == ["C", "X1", "X2"]
    assert isinstance(results[2], TypeError)
    # the failing group once, then each of its items alone, once; the other group untouched
    assert calls == [["a", "b", "\ud800", "c"], ["a"], ["b"], ["\ud800"], ["c"], ["x1", "x2"]]


def test_a_lone_request_that_fails_is_not_run_twice_and_a_group_failure_is_logged(caplog):
    calls = []

    def run(group):
        calls.append(group)
        raise ValueError("broken")

    assert isinstance(run_grouped(["a"], key=len, run=run)[0], ValueError)
    assert calls == [["a"]]
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        results = run_grouped(["a", "b"], key=len, run=run)
    assert all(isinstance(r, ValueError) for r in results)
    assert "a batch of 2 failed" in caplog.text


def test_a_run_that_returns_the_wrong_count_is_a_loud_bug():
    with pytest.raises(RuntimeError, match="2 requests got 1 results"):
        run_grouped(["a", "b"], key=len, run=lambda group: ["only one"])


@pytest.mark.parametrize("error, status, field, code", [
    (InvalidRequestError("loras", "x: not a LoRA (LoHa...)"), 422, "loras", "invalid_value"),
    (NotFoundError("loras", "no LoRA named 'x'"), 404, "loras", "lora_not_found"),
    (ModelLoadError("m.safetensors: incomplete sd15 checkpoint"), 422, "model", "model_unusable"),
    (UnsafeWeightsError("unet/x.bin: pickle"), 422, "model", "model_unusable"),
    (ActorDiedError(), 503, "request", "stage_unavailable"),
    (ActorUnavailableError("unreachable", None), 503, "request", "stage_unavailable"),
    (TimeoutError("the latents did not arrive"), 503, "request", "timeout"),
    (BackPressureError(num_queued_requests=9, max_queued_requests=8), 503, "request", "overloaded"),
])
def test_a_stage_failure_through_ray_is_answered_by_its_cause(error, status, field, code):
    upstream = RayServeException("Request to deployment 'VAEDecoder' failed because an "
                                 "upstream actor died before finishing a dependent task.")
    upstream.__cause__ = in_ray_wrapper(error)  # what Serve's router raises for a lost argument
    for raised in (error, in_ray_wrapper(error), in_ray_wrapper(in_ray_wrapper(error)), upstream):
        answer = translate(raised)
        assert isinstance(answer, ApiError), raised
        assert (answer.status or 422, answer.field, answer.code) == (status, field, code)
        if isinstance(error, (InvalidRequestError, ModelLoadError)):
            assert answer.message == error.message
        assert is_fault(raised) == (status == 503)


def test_a_bug_stays_a_bug():
    for error in (MissingComponentError("vae not loaded"), KeyError("x"), ZeroDivisionError(),
                  RayServeException("a Serve error of its own")):
        assert translate(in_ray_wrapper(error)) is not None
        assert not isinstance(translate(in_ray_wrapper(error)), ApiError)
        assert not is_fault(in_ray_wrapper(error))


# --- the HTTP layers ---------------------------------------------------------------------------

def make_app(max_in_flight: int = 2, max_body_bytes: int = 1000) -> FastAPI:
    app = FastAPI()
    release = asyncio.Event()
    app.state.release = release

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.post("/slow")
    async def slow() -> dict:
        await release.wait()
        return {"ok": True}

    @app.get("/bug")
    async def bug() -> dict:
        raise RuntimeError("/secret/path/to/weights.safetensors at 10.0.0.7 pid 4242")

    @app.get("/busy")
    async def busy() -> dict:
        raise ApiError("request", "timed out", status=503, code="timeout")

    settings = BackpressureSettings(max_requests_in_flight=max_in_flight, retry_after_s=7)
    install_error_handlers(app, settings.retry_after_s)
    install_guards(app, max_body_bytes, settings)
    install_middleware(app)
    return app


def fetch(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.request(method, path, **kwargs)
    return asyncio.run(go())


def test_a_bug_answers_a_generic_500_with_the_request_id_and_logs_the_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        response = fetch(make_app(), "GET", "/bug")
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    body = response.json()
    assert body["error"]["request_id"] == request_id and request_id in body["detail"]
    assert body["error"]["code"] == "internal_error" and body["error"]["type"] == "server_error"
    for leak in ("/secret", "10.0.0.7", "4242", "RuntimeError", "Traceback"):
        assert leak not in response.text
    assert request_id in caplog.text and "Traceback" in caplog.text and "/secret/path" in caplog.text


def test_a_clients_request_id_is_kept_and_an_insane_one_refused():
    app = make_app()
    response = fetch(app, "GET", "/busy", headers={"x-request-id": "trace-0af7651916cd43dd"})
    assert response.status_code == 503 and response.headers["retry-after"] == "7"
    assert response.json()["error"]["request_id"] == "trace-0af7651916cd43dd"
    for bad in ("has spaces in it", "x" * 201, "quote\"d"):
        response = fetch(app, "GET", "/busy", headers={"x-request-id": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "x-request-id"


def test_a_chunked_body_is_cut_off_at_the_limit_with_a_json_413():
    sent = []

    async def chunks():
        for _ in range(100):  # 100 x 100 bytes, no Content-Length
            sent.append(1)
            yield b"x" * 100

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app(max_body_bytes=1000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/echo", content=chunks())

    response = asyncio.run(go())
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "body"
    assert len(sent) <= 12  # reading stopped at the limit, not at the end of the body
    assert fetch(make_app(), "POST", "/echo", content=b"x" * 1000).json() == {"size": 1000}
    declared = fetch(make_app(), "POST", "/echo", content=b"x" * 1001)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "too_large"


def test_beyond_the_admission_limit_a_post_is_refused_at_once_in_json():
    app = make_app(max_in_flight=2)

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            held = [asyncio.ensure_future(http.post("/slow")) for _ in range(2)]
            await asyncio.sleep(0.05)
            refused = await http.post("/slow")
            listed = await http.post("/echo", content=b"{}")  # still refused: a POST
            app.state.release.set()
            return [refused, listed, *(await asyncio.gather(*held))]

    refused, listed, *served = asyncio.run(go())
    for response in (refused, listed):
        assert response.status_code == 503 and response.headers["retry-after"] == "7"
        assert response.json()["error"]["code"] == "overloaded"
    assert [r.status_code for r in served] == [200, 200]
    assert fetch(app, "POST", "/echo", content=b"{}").status_code == 200  # the slots came back
