"""Raydiance's own loop gives diffusers' latents: same components, prompt, seed and sampler."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from pipeline.conditioning import encode_prompts
from pipeline.denoise import DenoiseParams
from pipeline.samplers import SAMPLERS, make_scheduler
from tests.unit.denoising import denoise
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL

TOLERANCE = 1e-4


def _diffusers_latents(pipe, sampler: str, prompt: str, params: DenoiseParams,
                       negative: str | None) -> torch.Tensor:
    # From the model's own config: a config saved by another sampler carries its overrides
    # (use_karras_sigmas, ...) into the next one.
    pipe.scheduler = make_scheduler(sampler, pipe.original_scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt, negative_prompt=negative, num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale, width=params.width, height=params.height,
        generator=torch.Generator().manual_seed(params.seed), output_type="latent",
    ).images


def _ours(model, prompt: str, params: DenoiseParams, negative: str | None) -> torch.Tensor:
    (conditioning,) = encode_prompts(model, [prompt], [negative])
    return denoise(model, conditioning, params)


def _gap(model, pipe, prompt: str, params: DenoiseParams, negative: str | None) -> float:
    """The largest latent difference between ours and diffusers' pipeline, same request."""
    expected = _diffusers_latents(pipe, params.sampler, prompt, params, negative)
    return (_ours(model, prompt, params, negative) - expected).abs().max().item()


@pytest.fixture(scope="module")
def sd15_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_MODEL, local_files_only=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sd15_latents_match_diffusers(builtin_model, sd15_pipe, sampler):
    params = DenoiseParams(width=64, height=64, steps=12, guidance_scale=5.0, seed=7, sampler=sampler)
    assert _gap(builtin_model, sd15_pipe, "a green square on a purple background", params,
                None) <= TOLERANCE


def test_sd15_with_negative_prompt_and_odd_size(builtin_model, sd15_pipe):
    params = DenoiseParams(width=96, height=48, steps=8, guidance_scale=7.5, seed=3, sampler="Euler a")
    expected = _diffusers_latents(sd15_pipe, "Euler a", "a red circle", params, "a blue square")
    actual = _ours(builtin_model, "a red circle", params, "a blue square")
    assert actual.shape == (1, 4, 12, 24)
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("sampler,negative", [("Euler", None), ("DPM++ 2M Karras", "a white circle"),
                                              ("Euler a", "")])
def test_sdxl_latents_match_diffusers(sdxl_model, sdxl_pipe, sampler, negative):
    params = DenoiseParams(width=128, height=128, steps=6, guidance_scale=6.0, seed=11, sampler=sampler)
    assert _gap(sdxl_model, sdxl_pipe, "a yellow triangle on a black background", params,
                negative) <= TOLERANCE


def test_guidance_off_uses_one_row(builtin_model, sd15_pipe):
    params = DenoiseParams(width=64, height=64, steps=5, guidance_scale=1.0, seed=5)
    assert _gap(builtin_model, sd15_pipe, "a black square", params, None) <= TOLERANCE
