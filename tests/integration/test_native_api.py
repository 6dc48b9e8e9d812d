"""The native API through the whole DAG: PNGs, headers, seeds, and images equal to in-process ones."""
from __future__ import annotations

import numpy as np

from pipeline.unet.cache_config import default_cache_config
from pipeline.request_params import DenoiseParams
from pipeline.generate import generate

from tests.integration.conftest import png_pixels

PROMPT = "a red circle on a blue background"


def test_healthz_and_models(service):
    health = service.client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = service.client.get("/v1/models").json()
    assert models["object"] == "list"
    entry = models["data"][0]  # the configured model, then the checkpoints folder's
    assert entry["id"] == "tiny-shapes" and entry["native_size"] == 64 and entry["default"]
    assert [m["default"] for m in models["data"][1:]] == [False] * (len(models["data"]) - 1)


def test_generate_returns_png_with_seed_and_timings(service):
    response = service.generate(prompt=PROMPT, seed=7, steps=4)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-raydiance-seed"] == "7"
    assert response.headers["x-raydiance-model"] == "tiny-shapes"
    assert response.headers["x-raydiance-sampler"] == "Euler"
    for stage in ("encode", "denoise", "decode", "total"):
        assert float(response.headers[f"x-raydiance-{stage}-ms"]) >= 0
    assert "denoise;dur=" in response.headers["server-timing"]
    assert png_pixels(response.content).shape == (64, 64, 3)  # the model's native size


def test_size_sampler_and_random_seed(service):
    response = service.generate(prompt=PROMPT, width=96, height=48, steps=3, sampler="dpm++ 2m karras")
    assert response.status_code == 200, response.text
    assert png_pixels(response.content).shape == (48, 96, 3)
    assert response.headers["x-raydiance-sampler"] == "DPM++ 2M"  # an older combined name
    assert response.headers["x-raydiance-scheduler"] == "Karras"
    assert int(response.headers["x-raydiance-seed"]) >= 0  # drawn by the server, and reported


def test_same_seed_same_png(service):
    first = service.generate(prompt=PROMPT, seed=123, steps=5)
    second = service.generate(prompt=PROMPT, seed=123, steps=5)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    other = service.generate(prompt=PROMPT, seed=124, steps=5)
    assert other.content != first.content


def test_dag_draws_what_the_in_process_pipeline_draws(service, builtin_model):
    """Same seed, same parameters: the split stages give the in-process pixels exactly."""
    params = DenoiseParams(64, 64, steps=20, guidance_scale=5.0, seed=11, sampler="Euler",
                           cache=default_cache_config("sd15"))  # what the API applies by default
    expected = generate(builtin_model, PROMPT, params).pixels
    response = service.generate(prompt=PROMPT, seed=11, steps=20, guidance_scale=5.0, sampler="Euler")
    assert response.status_code == 200
    got = png_pixels(response.content)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
