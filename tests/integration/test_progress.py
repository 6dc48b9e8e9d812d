"""Progress while an image is made: server-sent step events, and A1111's /sdapi/v1/progress."""
from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import numpy as np
from PIL import Image

from tests.integration.conftest import png_pixels
from tests.integration.test_engine_http import denoiser_stats
from tools.tiny_shapes.world import classify

PROMPT = "a yellow square on a purple background"


def read_events(response: httpx.Response, limit: int | None = None) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
            if limit is not None and len(events) >= limit:
                break
    return events


def test_the_stream_reports_every_step_then_the_same_image_as_generate(service):
    body = {"prompt": PROMPT, "seed": 21, "steps": 12}
    with service.client.stream("POST", "/v1/generate/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    steps = [data for name, data in events if name == "step"]
    assert [s["step"] for s in steps] == list(range(1, 13)) and {s["steps"] for s in steps} == {12}
    (image,) = [data for name, data in events if name == "image"]
    assert events[-1][0] == "image" and image["seed"] == 21
    assert image["steps_computed"] + image["steps_cached"] == 12
    plain = service.generate(**body)
    streamed = png_pixels(base64.b64decode(image["png_base64"]))
    assert np.abs(streamed.astype(int) - png_pixels(plain.content).astype(int)).max() <= 1
    assert int(plain.headers["x-raydiance-steps-cached"]) == image["steps_cached"]
    assert all("preview" not in s for s in steps)  # only when asked for


def test_stream_previews_show_the_image_forming(service):
    body = {"prompt": PROMPT, "seed": 22, "steps": 10, "previews": True}
    with service.client.stream("POST", "/v1/generate/stream", json=body) as response:
        steps = [data for name, data in read_events(response) if name == "step"]
    previews = [png_pixels(base64.b64decode(s["preview"])) for s in steps]
    assert len(previews) == 10 and previews[0].shape == (16, 16, 3)  # latent-sized: 64 / 4
    assert not np.array_equal(previews[0], previews[-1])
    last = Image.fromarray(previews[-1]).resize((64, 64))
    assert classify(last) == ("yellow", "purple")


def test_a_bad_stream_request_is_refused_before_streaming(service):
    response = service.client.post("/v1/generate/stream", json={"prompt": PROMPT, "steps": 0})
    assert response.status_code == 422 and response.json()["error"]["param"] == "steps"


def test_closing_the_stream_stops_the_denoising(service):
    start = denoiser_stats()
    body = {"prompt": PROMPT, "seed": 1, "steps": 50, "width": 256, "height": 256,
            "cache": {"threshold": 0}}
    with httpx.Client(base_url=service.url, timeout=60) as client:
        with client.stream("POST", "/v1/generate/stream", json=body) as response:
            assert [name for name, _ in read_events(response, limit=2)] == ["step", "step"]
    deadline = time.monotonic() + 30
    while (stats := denoiser_stats())["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["active"] == 0 and stats["cancelled"] == start["cancelled"] + 1
    assert stats["forwards"] - start["forwards"] < 50


def test_a1111_progress_moves_while_txt2img_runs(service):
    body = {"prompt": PROMPT, "steps": 40, "width": 192, "height": 192, "cfg_scale": 5,
            "override_settings": {"cache": {"threshold": 0}}}
    result: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: result.append(service.client.post("/sdapi/v1/txt2img", json=body)))
    caller.start()
    seen, previews, skipped = [], [], []
    deadline = time.monotonic() + 120
    while caller.is_alive() and time.monotonic() < deadline:
        skip = len(seen) % 2 == 1  # every other poll says skip_current_image
        state = service.client.get("/sdapi/v1/progress",
                                   params={"skip_current_image": str(skip).lower()}).json()
        seen.append((state["progress"], state["state"]["sampling_step"], state["state"]["sampling_steps"]))
        if skip:
            skipped.append(state["current_image"])
        elif state["current_image"]:
            previews.append(png_pixels(base64.b64decode(state["current_image"])))
        time.sleep(0.1)
    caller.join(timeout=120)
    assert result and result[0].status_code == 200, result
    midway = [s for s in seen if 0 < s[0] < 1]
    assert midway, seen
    assert all(steps == 40 and 0 < step < 40 for _, step, steps in midway)
    assert [p for p, _, _ in midway] == sorted(p for p, _, _ in midway)  # it only moves forward
    assert previews and previews[-1].shape == (48, 48, 3)  # current_image: the latents' look
    assert skipped and all(image is None for image in skipped)
    idle = service.client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
