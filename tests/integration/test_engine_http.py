"""The Denoiser engine through HTTP: batch invariance, cancellation on disconnect, the cache's
fields and step counts in all three APIs."""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from tests.clients import leave_mid_denoise
from tests.integration.conftest import APP_NAME, png_pixels

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a black triangle on a yellow background", "a purple circle on an orange background",
           "a white square on a black background", "a yellow triangle on a green background",
           "a blue circle on a red background", "an orange square on a purple background"]
SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "Euler", "Euler a"]
THRESHOLDS = [0.0, 0.05, 0.1, 0.2, 0.0, 0.3, 0.1, 0.15]


def denoiser_stats(app: str = APP_NAME) -> dict[str, int]:
    from ray import serve

    handle = serve.get_deployment_handle("Denoiser", app)
    return handle.stats.remote().result(timeout_s=30)


def _body(i: int) -> dict:
    return {"prompt": PROMPTS[i], "seed": 40 + i, "steps": 8 + 2 * i, "sampler": SAMPLERS[i],
            "guidance_scale": 1.0 + i, "cache": {"threshold": THRESHOLDS[i]}}


def _ask(service, body: dict) -> tuple[np.ndarray, int, int]:
    response = service.generate(**body)
    assert response.status_code == 200, response.text
    return (png_pixels(response.content), int(response.headers["x-raydiance-steps-computed"]),
            int(response.headers["x-raydiance-steps-cached"]))


def test_a_request_gets_the_same_image_and_decisions_alone_or_amid_seven_others(service):
    bodies = [_body(i) for i in range(8)]
    alone = [_ask(service, body) for body in bodies]
    before = denoiser_stats()["forwards"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda body: _ask(service, body), bodies))
    forwards = denoiser_stats()["forwards"] - before
    assert forwards < sum(body["steps"] for body in bodies)  # they did share UNet forwards
    assert sum(cached for _, _, cached in together) > 0
    for body, (image, computed, cached), (solo, solo_computed, solo_cached) in zip(bodies, together, alone):
        assert (computed, cached) == (solo_computed, solo_cached), body
        assert computed + cached == body["steps"]
        assert np.abs(image.astype(int) - solo.astype(int)).max() <= 1, body
        if body["cache"]["threshold"] == 0:
            assert cached == 0


def test_a_request_whose_client_went_away_stops_using_the_unet(service):
    start = denoiser_stats()
    steps = 50  # at 256 x 256 several seconds of UNet work
    body = {"prompt": PROMPTS[0], "seed": 1, "steps": steps, "width": 256, "height": 256,
            "cache": {"threshold": 0}}
    leave_mid_denoise(f"{service.url}/v1/generate", body, lambda: denoiser_stats()["active"])
    deadline = time.monotonic() + 30
    while (stats := denoiser_stats())["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["active"] == 0
    assert stats["cancelled"] == start["cancelled"] + 1
    assert stats["forwards"] - start["forwards"] < steps  # it left long before its last step
    time.sleep(1.0)
    assert denoiser_stats()["forwards"] == stats["forwards"]  # and nothing runs for it any more
    _ask(service, {"prompt": PROMPTS[1], "seed": 2, "steps": 4})  # the service goes on


def test_native_cache_field_and_step_headers(service):
    off = _ask(service, {"prompt": PROMPTS[2], "seed": 3, "steps": 20, "cache": {"threshold": 0}})
    default = _ask(service, {"prompt": PROMPTS[2], "seed": 3, "steps": 20})
    eager = _ask(service, {"prompt": PROMPTS[2], "seed": 3, "steps": 20,
                           "cache": {"threshold": 0.5, "start": 0, "max_consecutive_hits": None}})
    assert off[1:] == (20, 0)
    assert default[2] > 0 and sum(default[1:]) == 20
    assert eager[2] > default[2]  # a looser cache skips more
    assert np.abs(default[0].astype(int) - off[0].astype(int)).mean() < 8  # close to uncached


def test_openai_cache_as_an_extra_body_field(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", timeout=120)
    raw = client.images.with_raw_response.generate(
        prompt=PROMPTS[3], n=2, extra_body={"seed": 5, "steps": 10, "cache": {"threshold": 0}})
    assert raw.headers["x-raydiance-steps-computed"] == "20"
    assert raw.headers["x-raydiance-steps-cached"] == "0"
    assert len(raw.parse().data) == 2
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt=PROMPTS[3], extra_body={"cache": {"threshold": "high"}})
    assert caught.value.body["param"] == "cache.threshold"


def test_a1111_cache_in_override_settings_and_counts_in_info(service):
    base = {"prompt": PROMPTS[4], "seed": 6, "steps": 12, "cfg_scale": 5, "width": 64, "height": 64,
            "batch_size": 2}
    response = service.client.post("/sdapi/v1/txt2img", json={
        **base, "override_settings": {"cache": {"threshold": 0}}})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["steps_computed"] == [12, 12] and info["steps_cached"] == [0, 0]
    assert info["cache"]["threshold"] == 0

    response = service.client.post("/sdapi/v1/txt2img", json={**base, "cache": {"threshold": 0.3}})
    info = json.loads(response.json()["info"])
    assert all(c + s == 12 for c, s in zip(info["steps_computed"], info["steps_cached"]))
    assert sum(info["steps_cached"]) > 0
    assert base64.b64decode(response.json()["images"][0])[:4] == b"\x89PNG"

    response = service.client.post("/sdapi/v1/txt2img", json={
        **base, "override_settings": {"cache": {"mode": "fast"}}})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "override_settings.cache.mode"
