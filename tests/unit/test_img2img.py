"""Image to image, inpainting and the hires fix's second pass, in process on the built-in model:
what the pictures look like (the world's classifier) and that a request's image does not depend
on what it was batched with."""
from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine
from pipeline.generate import generate_batch
from pipeline.init_image import encode_init_images
from pipeline.request_params import SourceImage
from pipeline.loading import load_model
from pipeline.unet.cache_config import default_cache_config
from pipeline.upscale import upscale_for_second_pass
from pipeline.upscaler_names import UPSCALERS
from pipeline.vae import decode_latents
from tools.random_models import build_random_sd15
from tools.tiny_shapes.world import Scene, classify, draw

RED_CIRCLE = np.asarray(draw(Scene("red", "circle", "blue"), np.random.default_rng(0)))
YELLOW = "a yellow circle on a blue background"
SEEDS = range(10)


def params(seed: int, strength: float = 1.0, steps: int = 20, size: int = 64) -> DenoiseParams:
    return DenoiseParams(size, size, steps=steps, guidance_scale=5.0, seed=seed, strength=strength)


def test_img2img_at_075_redraws_the_circle_in_the_prompts_colour(builtin_model):
    out = generate_batch(builtin_model, [YELLOW] * len(SEEDS), [params(s, 0.75) for s in SEEDS],
                         sources=[SourceImage("tiny", RED_CIRCLE)] * len(SEEDS))
    right = sum(classify(Image.fromarray(o.pixels)) == ("yellow", "blue") for o in out)
    assert right >= 8, right
    assert all(o.steps_computed + o.steps_cached == 15 for o in out)  # int(20 * 0.75) steps


def test_strength_zero_returns_the_input_through_the_vae(builtin_model):
    (out,) = generate_batch(builtin_model, [YELLOW], [params(1, 0.0)],
                            sources=[SourceImage("tiny", RED_CIRCLE)])
    assert out.steps_computed + out.steps_cached == 0
    roundtrip = decode_latents(builtin_model, encode_init_images(
        builtin_model, [SourceImage("tiny", RED_CIRCLE)])[0].latents)[0]
    assert np.array_equal(out.pixels, roundtrip)
    assert np.abs(out.pixels.astype(int) - RED_CIRCLE).mean() < 8  # the VAE's round trip
    assert classify(Image.fromarray(out.pixels)) == ("red", "blue")


def test_inpainting_the_centre_changes_the_shape_and_not_the_border(builtin_model):
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    source = SourceImage("tiny", RED_CIRCLE, mask)
    out = generate_batch(builtin_model, ["a green circle on a blue background"] * 6,
                         [params(s) for s in range(6)], sources=[source] * 6)
    green = sum(classify(Image.fromarray(o.pixels))[0] == "green" for o in out)
    assert green >= 5, green
    for o in out:
        assert np.abs(o.pixels.astype(int) - RED_CIRCLE)[mask == 0].max() <= 2


def test_an_img2img_request_batched_with_txt2img_ones_draws_what_it_draws_alone(builtin_model):
    source = SourceImage("tiny", RED_CIRCLE)
    (alone,) = generate_batch(builtin_model, [YELLOW], [params(7, 0.6)], sources=[source])
    mixed = generate_batch(builtin_model, ["a red square on a green background", YELLOW, YELLOW],
                           [params(3), params(7, 0.6), params(4, 0.9)],
                           sources=[None, source, source])
    assert torch.allclose(mixed[1].latents, alone.latents, atol=1e-4)  # batched GEMMs round apart
    assert np.abs(mixed[1].pixels.astype(int) - alone.pixels.astype(int)).max() <= 1


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos"])
def test_hires_fix_second_pass_at_twice_the_size_keeps_the_prompts_colours(builtin_model, upscaler):
    assert upscaler in UPSCALERS
    prompt = "a purple square on a white background"
    (first,) = generate_batch(builtin_model, [prompt], [params(5, steps=12)])
    init = upscale_for_second_pass(builtin_model, first.latents, 128, 128, upscaler)
    side = 128 // builtin_model.vae_scale_factor
    assert init.latents.shape[-2:] == (side, side)

    async def second():
        engine = DenoiseEngine()
        try:
            (conditioning,) = encode_prompts(builtin_model, [prompt], [None])
            return await engine.submit(builtin_model, conditioning,
                                       params(5, 0.6, steps=12, size=128), init=init)
        finally:
            await engine.close()

    result = asyncio.run(second())
    pixels = decode_latents(builtin_model, result.latents)[0]
    assert pixels.shape == (128, 128, 3)
    assert classify(Image.fromarray(pixels)) == ("purple", "white")


@pytest.fixture(scope="module")
def inpainting_sd15(tmp_path_factory):
    folder = build_random_sd15(tmp_path_factory.mktemp("inpaint") / "sd15-inpainting",
                               latent_size=16, inpainting=True)
    return load_model(folder)


def test_an_inpainting_unet_takes_mask_and_masked_image_and_keeps_the_border(inpainting_sd15):
    model = inpainting_sd15
    assert model.is_inpainting and model.latent_channels == 4
    size = model.native_size
    image = np.asarray(draw(Scene("red", "circle", "blue"), np.random.default_rng(0), size))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:-size // 4, size // 4:-size // 4] = 255
    source = SourceImage("inpainting", image, mask)
    (init,) = encode_init_images(model, [source])
    assert init.masked_latents is not None and init.masked_latents.shape == init.latents.shape
    out = generate_batch(model, ["a green circle", "a red square"],
                         [params(1, 1.0, steps=4, size=size), params(2, steps=4, size=size)],
                         sources=[source, None])  # txt2img beside it: mask 1, masked image 0
    assert np.abs(out[0].pixels.astype(int) - image)[mask == 0].max() <= 2
    assert not np.array_equal(out[0].pixels, image)
    assert out[1].pixels.shape == (size, size, 3)


def test_first_block_cache_skips_steps_of_an_img2img_request(builtin_model):
    cached = dataclasses.replace(params(3, 0.75), cache=default_cache_config("sd15"))
    (out,) = generate_batch(builtin_model, [YELLOW], [cached],
                            sources=[SourceImage("tiny", RED_CIRCLE)])
    assert out.steps_cached >= 2 and out.steps_computed + out.steps_cached == 15
    assert classify(Image.fromarray(out.pixels)) == ("yellow", "blue")
