"""Raydiance's own loop gives diffusers' latents: same components, prompt, seed, sampler and
schedule.

The diffusers side is written out here, apart from ``pipeline.samplers``: the scheduler class and
config each A1111 sampler and schedule name stands for, run by diffusers' own pipeline.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import AysSchedules

from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.sampler_names import SAMPLERS
from pipeline.samplers import EulerAncestralScheduler, scheduler_setup
from tests.unit.denoising import denoise
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL

TOLERANCE = 1e-4
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
DIFFUSERS = {  # A1111's sampler names, as diffusers' documentation maps them
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DDIM": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DPM++ SDE": (DPMSolverSDEScheduler, {}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, _SDE),
    "DPM++ 2M SDE Heun": (DPMSolverMultistepScheduler, {**_SDE, "solver_type": "heun"}),
    "DPM++ 3M SDE": (DPMSolverMultistepScheduler, {**_SDE, "solver_order": 3}),
    "Heun": (HeunDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "DPM2": (KDPM2DiscreteScheduler, {}),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}),
}
SCHEDULE_OPTIONS = {  # the schedules diffusers has a config option for
    "Automatic": {}, "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True}, "Beta": {"use_beta_sigmas": True},
    "Uniform": {"timestep_spacing": "linspace"}, "Normal": {"timestep_spacing": "linspace"},
    "SGM Uniform": {"timestep_spacing": "trailing"}, "Simple": {"timestep_spacing": "trailing"},
    "DDIM": {"timestep_spacing": "leading"},
}


def _diffusers_scheduler(pipe, params: DenoiseParams):
    """From the model's own config: a config saved by another sampler carries its overrides
    (use_karras_sigmas, ...) into the next one."""
    scheduler_class, overrides = DIFFUSERS[params.sampler]
    overrides = {**overrides, **SCHEDULE_OPTIONS.get(params.schedule, {})}
    if scheduler_class is DPMSolverSDEScheduler:
        overrides["noise_sampler_seed"] = params.seed  # its Brownian tree, seeded per request
    return scheduler_class.from_config(pipe.original_scheduler_config, **overrides)


def _diffusers_latents(pipe, prompt: str, params: DenoiseParams, negative: str | None,
                       scheduler=None, timesteps: dict | None = None) -> torch.Tensor:
    pipe.scheduler = scheduler or _diffusers_scheduler(pipe, params)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt, negative_prompt=negative, guidance_scale=params.guidance_scale,
        **(timesteps or {"num_inference_steps": params.steps}), width=params.width,
        height=params.height, generator=torch.Generator().manual_seed(params.seed), output_type="latent",
    ).images


def _ours(model, prompt: str, params: DenoiseParams, negative: str | None) -> torch.Tensor:
    (conditioning,) = encode_prompts(model, [prompt], [negative])
    return denoise(model, conditioning, params)


def _gap(model, pipe, prompt: str, params: DenoiseParams, negative: str | None = None, **diffusers) -> float:
    """The largest latent difference between ours and diffusers' pipeline, same request."""
    expected = _diffusers_latents(pipe, prompt, params, negative, **diffusers)
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


def test_every_served_sampler_is_checked_here():
    assert set(SAMPLERS) == set(DIFFUSERS)


@pytest.mark.parametrize("sampler", list(DIFFUSERS))
def test_sd15_latents_match_diffusers(builtin_model, sd15_pipe, sampler):
    params = DenoiseParams(width=64, height=64, steps=8, guidance_scale=5.0, seed=7, sampler=sampler)
    assert _gap(builtin_model, sd15_pipe, "a green square on a purple background", params) <= TOLERANCE


@pytest.mark.parametrize("sampler,schedule", [
    ("Euler", "Karras"), ("DPM++ 2M", "Karras"), ("DPM++ 2M SDE", "Exponential"), ("Heun", "Beta"),
    ("DPM++ SDE", "Karras"), ("DPM2 a", "Exponential"), ("LMS", "Karras"), ("DDIM", "Normal"),
    ("DDIM", "SGM Uniform"), ("UniPC", "Uniform"), ("Euler a", "Simple"), ("PLMS", "DDIM"),
])
def test_sd15_schedules_as_diffusers_options_match_diffusers(builtin_model, sd15_pipe, sampler, schedule):
    params = DenoiseParams(width=64, height=64, steps=6, guidance_scale=5.0, seed=9, sampler=sampler,
                           schedule=schedule)
    assert _gap(builtin_model, sd15_pipe, "a red triangle on a white background", params) <= TOLERANCE


def _kl_optimal(train_sigmas: np.ndarray, steps: int) -> list[float]:
    """A1111's KL Optimal: ``steps + 1`` sigmas from sigma_max down to sigma_min."""
    low, high = np.arctan(train_sigmas[0]), np.arctan(train_sigmas[-1])
    fraction = np.arange(steps + 1) / steps
    return np.tan(fraction * low + (1 - fraction) * high).tolist()


def test_explicit_sigma_schedules_match_diffusers_given_those_sigmas(builtin_model, sd15_pipe):
    """Align Your Steps at its own 10 steps is diffusers' published schedule; KL Optimal is
    A1111's formula; both go to diffusers' Euler as ``sigmas=``."""
    prompt = "a blue circle on a yellow background"
    params = DenoiseParams(64, 64, steps=10, guidance_scale=5.0, seed=4, schedule="Align Your Steps")
    ays = {"sigmas": AysSchedules["StableDiffusionSigmas"]}
    assert _gap(builtin_model, sd15_pipe, prompt, params, timesteps=ays) <= TOLERANCE
    alphas = sd15_pipe.scheduler.alphas_cumprod.double().numpy()
    kl = {"sigmas": _kl_optimal(((1 - alphas) / alphas) ** 0.5, 7)}
    params = DenoiseParams(64, 64, steps=7, guidance_scale=5.0, seed=4, schedule="KL Optimal")
    assert _gap(builtin_model, sd15_pipe, prompt, params, timesteps=kl) <= TOLERANCE


def test_euler_a_karras_is_diffusers_euler_a_on_diffusers_karras_sigmas(builtin_model, sd15_pipe):
    """diffusers' Euler a has no Karras option: ours takes the sigmas diffusers' Euler sets
    with ``use_karras_sigmas``, and with its own sigmas it is diffusers' Euler a exactly."""
    config = sd15_pipe.original_scheduler_config
    karras = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    karras.set_timesteps(6)
    params = DenoiseParams(64, 64, steps=6, guidance_scale=5.0, seed=5, sampler="Euler a",
                           schedule="Karras")
    assert _gap(builtin_model, sd15_pipe, "a white square on a black background", params,
                scheduler=EulerAncestralScheduler.from_config(config),
                timesteps={"sigmas": karras.sigmas.tolist()}) <= TOLERANCE
    plain = EulerAncestralDiscreteScheduler.from_config(config)
    given = EulerAncestralScheduler.from_config(config)
    plain.set_timesteps(9)
    given.set_timesteps(sigmas=plain.sigmas.numpy())
    assert torch.allclose(given.timesteps, plain.timesteps, atol=1e-3)
    assert torch.equal(given.sigmas, plain.sigmas)


def test_timesteps_only_samplers_take_explicit_schedules_as_timesteps(builtin_model, sd15_pipe):
    """DPM++ 2M and Heun take no sigmas: Align Your Steps reaches them as the whole timesteps
    where its sigmas lie, those diffusers publishes for 10 steps (within one)."""
    config = sd15_pipe.original_scheduler_config
    _, given = scheduler_setup("DPM++ 2M", "Align Your Steps", config, 10, "sd15")
    assert np.abs(np.subtract(given["timesteps"], AysSchedules["StableDiffusionTimesteps"])).max() <= 1
    for sampler in ("DPM++ 2M", "Heun"):
        params = DenoiseParams(64, 64, steps=5, guidance_scale=5.0, seed=6, sampler=sampler,
                               schedule="Align Your Steps")
        _, timesteps = scheduler_setup(sampler, params.schedule, config, params.steps, "sd15")
        assert _gap(builtin_model, sd15_pipe, "a red square", params, timesteps=timesteps) <= TOLERANCE


def test_sd15_with_negative_prompt_and_odd_size(builtin_model, sd15_pipe):
    params = DenoiseParams(width=96, height=48, steps=8, guidance_scale=7.5, seed=3, sampler="Euler a")
    expected = _diffusers_latents(sd15_pipe, "a red circle", params, "a blue square")
    actual = _ours(builtin_model, "a red circle", params, "a blue square")
    assert actual.shape == (1, 4, 12, 24)
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("sampler,schedule,negative", [
    ("Euler", "Automatic", None), ("DPM++ 2M", "Karras", "a white circle"), ("Euler a", "Automatic", ""),
    ("DPM2 a", "Automatic", None),
])
def test_sdxl_latents_match_diffusers(sdxl_model, sdxl_pipe, sampler, schedule, negative):
    params = DenoiseParams(width=128, height=128, steps=6, guidance_scale=6.0, seed=11, sampler=sampler,
                           schedule=schedule)
    assert _gap(sdxl_model, sdxl_pipe, "a yellow triangle on a black background", params,
                negative) <= TOLERANCE


def test_sdxl_align_your_steps_is_the_sdxl_schedule(sdxl_model, sdxl_pipe):
    params = DenoiseParams(width=128, height=128, steps=10, guidance_scale=6.0, seed=2,
                           schedule="Align Your Steps")
    ays = {"sigmas": AysSchedules["StableDiffusionXLSigmas"]}
    assert _gap(sdxl_model, sdxl_pipe, "a green circle", params, timesteps=ays) <= TOLERANCE


def test_guidance_off_uses_one_row(builtin_model, sd15_pipe):
    params = DenoiseParams(width=64, height=64, steps=5, guidance_scale=1.0, seed=5)
    assert _gap(builtin_model, sd15_pipe, "a black square", params) <= TOLERANCE
