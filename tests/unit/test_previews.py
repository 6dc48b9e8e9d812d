"""Step previews: the engine's latent-to-RGB look of a request mid-denoising, without a VAE."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine
from pipeline.model_configs import ModelConfigs
from pipeline.preview import FAMILY_LATENT_RGB, LatentRGB
from tools.tiny_shapes.world import classify


def _steps(model, prompt: str, sampler: str, previews: bool) -> list:
    (conditioning,) = encode_prompts(model, [prompt], [None])
    seen: list = []

    async def run():
        engine = DenoiseEngine(max_batch_rows=4)
        try:
            await asyncio.wait_for(engine.submit(
                model, conditioning, DenoiseParams(64, 64, steps=12, seed=3, sampler=sampler),
                on_step=lambda done, total, preview: seen.append((done, total, preview)),
                previews=previews), 120)
        finally:
            await engine.close()

    asyncio.run(run())
    return seen


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])  # with and without an x0 estimate
def test_the_last_preview_shows_the_prompts_colours(builtin_model, sampler):
    steps = _steps(builtin_model, "a yellow square on a green background", sampler, True)
    assert [done for done, _, _ in steps] == list(range(1, 13))
    preview = steps[-1][2]
    assert preview.shape == (16, 16, 3) and preview.dtype == np.uint8  # latent-sized
    assert classify(Image.fromarray(preview).resize((64, 64))) == ("yellow", "green")
    assert not np.array_equal(steps[0][2], preview)  # the look changes as the steps go


def test_no_preview_is_made_unless_asked(builtin_model):
    assert all(preview is None for _, _, preview in _steps(builtin_model, "a red circle", "Euler", False))


def test_a_model_brings_its_own_map_else_its_familys(builtin_model, tmp_path):
    own = builtin_model.configs.latent_rgb
    assert own is builtin_model.configs.own_latent_rgb and own != FAMILY_LATENT_RGB["sd15"]
    plain = ModelConfigs.with_index("sdxl", {}, unet={}, vae={}, scheduler={})
    assert plain.latent_rgb is FAMILY_LATENT_RGB["sdxl"]


def test_a_map_refuses_latents_of_another_width():
    with pytest.raises(ValueError, match="16 latent channels"):
        FAMILY_LATENT_RGB["sd15"](torch.zeros(16, 8, 8))
    assert LatentRGB.from_json(FAMILY_LATENT_RGB["sdxl"].to_json()) == FAMILY_LATENT_RGB["sdxl"]
