"""The AUTOMATIC1111 API, as Open WebUI and SillyTavern call it."""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import numpy as np
import pytest
from PIL import Image

from pipeline.sampler_names import SAMPLERS, SCHEDULES
from tools.tiny_shapes.world import classify

from tests.integration.conftest import png_pixels


def test_open_webui_flow(service):
    """Open WebUI's automatic1111 engine: verify URL, list models, select one, generate."""
    http = service.client
    assert http.get("/sdapi/v1/options").status_code == 200  # "verify connection"
    models = [{"id": m["title"], "name": m["model_name"]} for m in http.get("/sdapi/v1/sd-models").json()]
    assert models[0] == {"id": "tiny-shapes", "name": "tiny-shapes"}  # the configured one first
    options = http.get("/sdapi/v1/options").json()
    options["sd_model_checkpoint"] = models[0]["id"]  # it posts the whole object back
    assert http.post("/sdapi/v1/options", json=options).status_code == 200
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-shapes"

    data = {"prompt": "a blue square on a yellow background", "batch_size": 2, "width": 64,
            "height": 64, "steps": 20, "negative_prompt": "", "cfg_scale": 5}
    response = http.post("/sdapi/v1/txt2img", json=data)
    assert response.status_code == 200, response.text
    result = response.json()
    assert len(result["images"]) == 2
    for image in result["images"]:
        assert png_pixels(base64.b64decode(image)).shape == (64, 64, 3)
    info = json.loads(result["info"])
    assert len(info["all_seeds"]) == 2 and info["all_seeds"][1] == info["seed"] + 1
    assert info["sd_model_name"] == "tiny-shapes" and info["sampler_name"] == "Euler"
    pictures = [classify(Image.fromarray(png_pixels(base64.b64decode(i)))) for i in result["images"]]
    assert ("blue", "yellow") in pictures


def test_txt2img_seed_sampler_scheduler_and_override(service):
    body = {"prompt": "a orange circle on a green background", "seed": 42, "steps": 3,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "n_iter": 2,
            "override_settings": {"sd_model_checkpoint": "tiny-shapes"}, "restore_faces": False}
    result = service.client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(result["info"])
    assert info["all_seeds"] == [42, 43]
    assert info["sampler_name"] == "DPM++ 2M"
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in info["infotexts"][0]
    assert result["parameters"]["seed"] == 42
    again = service.client.post("/sdapi/v1/txt2img", json=body).json()
    # The request's two images may share their forwards differently the second time (the
    # embedding cache answers faster, so the second image can join the first a step earlier or
    # later); the engine's batches change only the last bits, never a pixel by more than 1.
    for first, second in zip(result["images"], again["images"], strict=True):
        first, second = (png_pixels(base64.b64decode(i)).astype(int) for i in (first, second))
        assert np.abs(first - second).max() <= 1


def test_read_endpoints(service):
    http = service.client
    assert [s["name"] for s in http.get("/sdapi/v1/samplers").json()] == list(SAMPLERS)
    assert [s["label"] for s in http.get("/sdapi/v1/schedulers").json()] == list(SCHEDULES)
    assert [u["name"] for u in http.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]
    assert http.get("/sdapi/v1/sd-vae").json() == []
    progress = http.get("/sdapi/v1/progress").json()
    assert 0.0 <= progress["progress"] <= 1.0 and "state" in progress


@pytest.mark.parametrize("body,status,field", [
    ({"sampler_name": "LMS Heun 9"}, 422, "sampler_name"),
    ({"scheduler": "no-such-schedule"}, 422, "scheduler"),
    ({"cfg_scale": -2}, 422, "cfg_scale"),
    ({"width": 100}, 422, "width"),
    ({"batch_size": 3, "n_iter": 2}, 422, "batch_size"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, 404, "override_settings.sd_model_checkpoint"),
])
def test_txt2img_bad_requests(service, body, status, field):
    response = service.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **body})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == field


def test_options_refuse_an_unknown_checkpoint(service):
    response = service.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "sd_model_checkpoint"
    assert service.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-shapes"


@pytest.mark.parametrize("how", ["interrupt", "skip"])
def test_interrupt_and_skip_stop_the_txt2img_in_flight(service, how):
    """SillyTavern's cancel and webuiapi's interrupt: the request in flight answers at once
    (200, no image finished) instead of running its 50 steps, and /progress says so."""
    def slow() -> httpx.Response:
        return service.client.post("/sdapi/v1/txt2img", json={
            "prompt": "a red circle on a blue background", "steps": 50, "seed": 3,
            "cache": {"threshold": 0}})

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(slow)
        deadline = time.monotonic() + 60
        while service.client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline and not pending.done(), "never started"
            time.sleep(0.05)
        assert service.client.post(f"/sdapi/v1/{how}").status_code == 200
        response = pending.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["images"] == []
    state = service.client.get("/sdapi/v1/progress").json()["state"]
    assert state["interrupted" if how == "interrupt" else "skipped"] is True
    assert state["job_count"] == 0
    # the next request runs normally and clears the flag
    assert len(service.client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle",
                                                              "steps": 4}).json()["images"]) == 1
    assert service.client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is False
