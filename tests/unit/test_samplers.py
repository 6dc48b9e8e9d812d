"""Samplers and schedules by A1111's names: what is served together, what is refused, and the
stochastic and second-order samplers in the engine (same seed, same image, alone or batched)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from pipeline.conditioning import encode_prompts
from pipeline.denoise import Trajectory
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine
from pipeline.errors import InvalidRequestError
from pipeline.sampler_names import SAMPLERS, SCHEDULES, canonical_schedule_name, resolve_sampler
from pipeline.samplers import make_sampler, scheduler_setup
from pipeline.unet.cache_config import FirstBlockCacheConfig
from tests.unit.denoising import denoise


@pytest.mark.parametrize("sampler,schedule,expected", [
    ("DPM++ 2M", "karras", ("DPM++ 2M", "Karras")),
    ("euler a", "KARRAS", ("Euler a", "Karras")),
    ("DDIM", "normal", ("DDIM", "Normal")),  # SillyTavern's default
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),  # older combined names
    ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
    ("dpm++ 2m sde heun exponential", "exponential", ("DPM++ 2M SDE Heun", "Exponential")),
    ("Euler a Karras", None, ("Euler a", "Karras")),
    ("k_dpmpp_2m", "sgm_uniform", ("DPM++ 2M", "SGM Uniform")),
    ("Heun", "SGMUniform", ("Heun", "SGM Uniform")),
    (None, None, ("Euler", "Automatic")),
])
def test_names_match_case_insensitively_on_labels_keys_and_aliases(sampler, schedule, expected):
    assert resolve_sampler(sampler, schedule) == expected


@pytest.mark.parametrize("sampler,schedule,family,field", [
    ("DDIM", "Karras", None, "scheduler"),  # DDIMScheduler takes no sigmas of any kind
    ("PLMS", "Exponential", None, "scheduler"),
    ("LMS", "KL Optimal", None, "scheduler"),  # LMS takes neither sigmas nor timesteps
    ("DPM++ 2M", "Polyexponential", None, "scheduler"),  # sigmas only
    ("DPM++ 2M Karras", "exponential", None, "scheduler"),  # the name says otherwise
    ("Euler", "Linear Quadratic", None, "scheduler"),
    ("Heun++", None, None, "sampler"),
    ("DPM++ 2S a", None, None, "sampler"),
])
def test_refused_combinations_name_the_field(sampler, schedule, family, field):
    with pytest.raises(InvalidRequestError) as raised:
        resolve_sampler(sampler, schedule, family)
    assert raised.value.field == field


def test_align_your_steps_only_where_the_family_has_a_schedule():
    assert resolve_sampler("Euler", "align_your_steps", "sdxl") == ("Euler", "Align Your Steps")
    with pytest.raises(InvalidRequestError, match="svd") as raised:
        resolve_sampler("Euler", "Align Your Steps", "svd")
    assert raised.value.field == "scheduler"


def test_a_refused_combination_fails_the_trajectory_naming_scheduler(builtin_model):
    (conditioning,) = encode_prompts(builtin_model, ["a red circle"], [None])
    with pytest.raises(InvalidRequestError) as raised:
        Trajectory(builtin_model, conditioning, DenoiseParams(64, 64, steps=4, sampler="DDIM",
                                                              schedule="Karras"))
    assert raised.value.field == "scheduler" and "does not take" in str(raised.value)


def test_every_listed_schedule_is_served_by_some_sampler(builtin_model):
    config = builtin_model.scheduler_config
    for schedule in SCHEDULES:
        served = [s for s in SAMPLERS if _serves(s, schedule, config)]
        assert served, schedule
    assert canonical_schedule_name("sgm_uniform") == "SGM Uniform"


def _serves(sampler: str, schedule: str, config) -> bool:
    try:
        make_sampler(sampler, schedule, config, 5, "cpu", "sd15", seed=1)
    except InvalidRequestError:
        return False
    return True


def test_schedules_set_the_noise_levels_they_name(builtin_model):
    config = builtin_model.scheduler_config
    karras = make_sampler("Euler", "Karras", config, 8, "cpu", "sd15")
    plain = make_sampler("Euler", "Automatic", config, 8, "cpu", "sd15")
    assert karras.config.use_karras_sigmas and not torch.allclose(karras.sigmas, plain.sigmas)
    trailing = make_sampler("DDIM", "SGM Uniform", config, 4, "cpu", "sd15")
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]
    leading = make_sampler("DDIM", "DDIM", config, 4, "cpu", "sd15")
    assert leading.timesteps.tolist() == [751, 501, 251, 1]
    _, given = scheduler_setup("Euler", "Polyexponential", config, 6, "sd15")
    sigmas = np.array(given["sigmas"])  # rho 1: log-evenly from sigma_max to sigma_min, then 0
    assert sigmas[-1] == 0 and np.allclose(np.diff(np.log(sigmas[:-1])), np.log(sigmas[1] / sigmas[0]))
    sde = make_sampler("DPM++ SDE", "Automatic", config, 4, "cpu", "sd15", seed=123)
    assert sde.config.noise_sampler_seed == 123


STOCHASTIC = [("DPM++ SDE", "Karras"), ("DPM++ 2M SDE", "Automatic"), ("DPM++ 3M SDE", "Exponential"),
              ("DPM2 a", "Automatic"), ("Euler a", "Karras"), ("Heun", "Align Your Steps"),
              ("DPM2", "Beta"), ("PLMS", "Normal")]
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a black triangle on a yellow background", "a purple circle on an orange background",
           "a white square on a black background", "a yellow triangle on a green background",
           "a blue circle on a red background", "an orange square on a purple background"]


def _params(i: int, seed: int, cache: FirstBlockCacheConfig | None = None) -> DenoiseParams:
    sampler, schedule = STOCHASTIC[i]
    return DenoiseParams(64, 64, steps=4 + i % 3, seed=seed, sampler=sampler, schedule=schedule,
                         guidance_scale=5.0, cache=cache)


def _run(model, requests, on_step=None):
    async def run():
        engine = DenoiseEngine(max_batch_rows=16)
        results = await asyncio.wait_for(asyncio.gather(*(
            engine.submit(model, c, p, on_step=on_step) for c, p in requests)), 120)
        await engine.close()
        return results

    return asyncio.run(run())


def test_stochastic_and_second_order_samplers_give_a_seed_its_image_alone_or_batched(builtin_model):
    """Noise from the request's own generator (or, for DPM++ SDE, a Brownian tree seeded with
    its seed): a seed's image does not depend on its neighbours; another seed differs."""
    conditionings = encode_prompts(builtin_model, PROMPTS, [None] * len(PROMPTS))
    requests = [(c, _params(i, seed=20 + i)) for i, c in enumerate(conditionings)]
    together = _run(builtin_model, requests)
    for (conditioning, params), result in zip(requests, together):
        alone = denoise(builtin_model, conditioning, params)
        assert torch.allclose(result.latents, alone, atol=1e-4), params.sampler
        again = denoise(builtin_model, conditioning, params)
        assert torch.equal(alone, again), params.sampler
    for i in range(5):  # the stochastic ones: another seed, other noise
        conditioning, params = requests[i]
        other = _run(builtin_model, [(conditioning, _params(i, seed=99))])[0]
        assert not torch.allclose(other.latents, together[i].latents, atol=1e-2), params.sampler


def test_second_order_steps_count_unet_evaluations_and_the_cache_is_sized_to_them(builtin_model):
    """Heun and DPM2 evaluate the UNet twice per step but the last: progress, the step counts
    and First Block Cache's state all count evaluations (2 * steps - 1)."""
    (conditioning,) = encode_prompts(builtin_model, PROMPTS[:1], [None])
    cache = FirstBlockCacheConfig(threshold=0.5, max_consecutive_hits=1)
    progress: list[tuple[int, int]] = []
    for sampler in ("Heun", "DPM2"):
        params = DenoiseParams(64, 64, steps=6, seed=3, sampler=sampler, cache=cache)
        progress.clear()
        (result,) = _run(builtin_model, [(conditioning, params)],
                         lambda done, total, _: progress.append((done, total)))
        assert progress[-1] == (11, 11) and len(progress) == 11
        assert result.steps_computed + result.steps_cached == 11 and result.steps_cached > 0
    plms = DenoiseParams(64, 64, steps=6, seed=3, sampler="PLMS")
    (result,) = _run(builtin_model, [(conditioning, plms)])
    assert result.steps_computed == 7  # PLMS's first step takes two evaluations
