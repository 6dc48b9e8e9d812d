"""Each stage holds only its own part of a model, and images are what the whole model draws.

Through the whole DAG over HTTP, for a small random SD1.5 (a diffusers folder) and a small random
SDXL (a single-file checkpoint): after a request for a model, the TextEncoder replica holds that
model's text encoders, the Denoiser its UNet, the VAEDecoder its VAE, each with the tensor bytes
the whole model has for that component, and nothing else. (Only models no test gives LoRAs to:
adapters add their own tensors to the components that take them.)
"""
from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.unet.cache_config import default_cache_config
from pipeline.request_params import DenoiseParams
from pipeline.generate import generate
from pipeline.images import encode_png
from pipeline.loading import load_model
from pipeline.memory import component_bytes

from tests.integration.conftest import APP_NAME

PROMPT = "a red circle on a blue background"
STAGE_COMPONENTS = {"TextEncoder": {"text_encoder", "text_encoder_2"}, "Denoiser": {"unet"},
                    "VAEDecoder": {"vae"}}


def stage_stats(stage: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(stage, APP_NAME).stats.remote().result(timeout_s=30)


@pytest.mark.parametrize("name, file", [("random-sd15", "random-sd15"),
                                        ("random-sdxl", "random-sdxl.safetensors")])
def test_each_stage_holds_exactly_its_components(service, name, file):
    whole = component_bytes(load_model(service.checkpoints_dir / file))
    response = service.generate(prompt=PROMPT, model=name, steps=2, seed=1)
    assert response.status_code == 200, response.text

    for stage, names in STAGE_COMPONENTS.items():
        stats = stage_stats(stage)
        expected = {component: size for component, size in whole.items() if component in names}
        assert stats["models"][name] == expected, stage
        for model, held in stats["models"].items():  # no model holds another stage's part here
            assert set(held) <= names, (stage, model, held)
        memory = stats["memory"]
        assert memory["rss_bytes"] >= memory["rss_at_start_bytes"] > 0
        assert memory["peak_rss_bytes"] >= memory["rss_bytes"]
        assert memory["cuda_allocated_bytes"] is None  # a CPU replica: nothing on a card
    assert len(stage_stats("TextEncoder")["models"][name]) == (2 if name == "random-sdxl" else 1)


def test_the_split_stages_draw_the_whole_models_png_byte_for_byte(service, builtin_model):
    response = service.generate(prompt=PROMPT, seed=5, steps=6, guidance_scale=5.0, sampler="Euler")
    assert response.status_code == 200, response.text
    params = DenoiseParams(64, 64, steps=6, guidance_scale=5.0, seed=5, sampler="Euler",
                           cache=default_cache_config("sd15"))  # what the API applies by default
    pixels = generate(builtin_model, PROMPT, params).pixels
    parameters = Image.open(io.BytesIO(response.content)).info["parameters"]
    assert response.content == encode_png(pixels, parameters)
