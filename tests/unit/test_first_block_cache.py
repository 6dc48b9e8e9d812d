"""First Block Cache: exact when off, close when on, decided per request whatever the batch."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import diffusers
from diffusers import UNet2DConditionModel

from pipeline.conditioning import encode_prompts
from pipeline.vae import decode_latents
from pipeline.denoise import Trajectory
from pipeline.request_params import DenoiseParams
from pipeline.errors import InvalidRequestError
from pipeline.unet.cache_config import FirstBlockCacheConfig, default_cache_config
from pipeline.unet.cache_state import CacheState, extrapolation_weights
from pipeline.unet.first_block_cache import FirstBlockCache
from pipeline.unet.forward import forward
from pipeline.unet.split import REPRODUCED_DIFFUSERS, run_head, run_out, run_tail
from tests.unit.denoising import denoise

PROMPT = "a red circle on a blue background"
NEVER_SKIPS = FirstBlockCacheConfig(threshold=0.5, start=1.0, end=1.0)  # on, so the split forward runs; empty window


def _denoise(model, prompt: str, params: DenoiseParams) -> torch.Tensor:
    (conditioning,) = encode_prompts(model, [prompt], [None])
    return denoise(model, conditioning, params)


def decomposed_forward(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
                       encoder_hidden_states: torch.Tensor,
                       added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Head, tail and output layers on all rows: to be bitwise ``unet(...)[0]``."""
    head = run_head(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
    return run_out(unet, run_tail(unet, head))


def _run_together(model, jobs: list[Trajectory]) -> list[list[torch.Tensor]]:
    """Step the jobs in shared forwards as the engine does; returns each job's noise predictions."""
    outputs: list[list[torch.Tensor]] = [[] for _ in jobs]
    while pending := [i for i, j in enumerate(jobs) if not j.done]:
        result = FirstBlockCache.forward(model.unet, [jobs[i].unet_rows() for i in pending],
                                         [jobs[i].cache for i in pending])
        expected_tail = sum(jobs[i].rows for i, hit in zip(pending, result.cached) if not hit)
        assert result.tail_rows == expected_tail and result.rows == sum(jobs[i].rows for i in pending)
        for i, noise_pred in zip(pending, result.outputs):
            outputs[i].append(noise_pred)
            jobs[i].advance(noise_pred)
    return outputs


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("size", [(64, 64), (72, 40)])  # 72x40: odd latent sides, forwarded upsample sizes
def test_split_unet_is_bitwise_diffusers_0_42(builtin_model, sdxl_model, size):
    """``pipeline.unet.split`` copies the forward of diffusers 0.42, the version pyproject.toml
    pins: head, tail and output layers in a row give ``unet(...)`` bit for bit."""
    assert diffusers.__version__.startswith(REPRODUCED_DIFFUSERS + "."), (
        f"the split copies diffusers {REPRODUCED_DIFFUSERS}'s forward; installed: {diffusers.__version__}")
    torch.manual_seed(0)
    for model, factor in [(builtin_model, 4), (sdxl_model, 8)]:
        unet = model.unet
        sample = torch.randn(3, 4, size[1] // factor, size[0] // factor)
        timestep = torch.tensor([981.0, 500.0, 21.0])
        ehs = torch.randn(3, 77, unet.config.cross_attention_dim)
        added = None
        if model.family == "sdxl":
            added = {"text_embeds": torch.randn(3, 48), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 3)}
        with torch.inference_mode():
            expected = unet(sample, timestep, encoder_hidden_states=ehs, added_cond_kwargs=added,
                            return_dict=False)[0]
            assert torch.equal(decomposed_forward(unet, sample, timestep, ehs, added), expected)


def test_threshold_zero_is_bitwise_uncached_builtin(builtin_model):
    params = DenoiseParams(64, 64, steps=10, guidance_scale=5.0, seed=3)
    reference = _denoise(builtin_model, PROMPT, params)
    for cache in [FirstBlockCacheConfig(threshold=0.0), NEVER_SKIPS, default_cache_config("sd15").with_overrides({"threshold": 0})]:
        assert torch.equal(_denoise(builtin_model, PROMPT, dataclasses.replace(params, cache=cache)),
                           reference)


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_threshold_zero_is_bitwise_uncached_sdxl(sdxl_model, size):
    """SDXL: added text_time embeddings, a first down block without attention, odd latent sides."""
    params = DenoiseParams(*size, steps=6, guidance_scale=5.0, seed=5)
    reference = _denoise(sdxl_model, PROMPT, params)
    for cache in [FirstBlockCacheConfig(threshold=0.0), NEVER_SKIPS]:
        assert torch.equal(_denoise(sdxl_model, PROMPT, DenoiseParams(*size, steps=6, guidance_scale=5.0,
                                                                       seed=5, cache=cache)), reference)


def test_batch_of_misses_is_bitwise_plain_forward(builtin_model):
    """With caches on but nobody skipping, a shared forward equals the plain one, row for row."""
    conds = encode_prompts(builtin_model, [PROMPT, "a green square on a white background"], [None, None])
    jobs = [Trajectory(builtin_model, c, DenoiseParams(64, 64, steps=4, seed=i, cache=NEVER_SKIPS))
            for i, c in enumerate(conds)]
    rows = [j.unet_rows() for j in jobs]
    result = FirstBlockCache.forward(builtin_model.unet, rows, [j.cache for j in jobs])
    for ours, plain in zip(result.outputs, forward(builtin_model.unet, rows)):
        assert torch.equal(ours, plain)
    assert result.tail_rows == result.rows == 4 and [j.cache.steps_computed for j in jobs] == [1, 1]
    with pytest.raises(ValueError):
        FirstBlockCache.forward(builtin_model.unet, rows, [jobs[0].cache])


@pytest.mark.parametrize("mode", ["reuse", "residual"])
def test_cache_skips_steps_and_stays_close(builtin_model, mode):
    prompts = [PROMPT, "a yellow triangle on a purple background"]
    conds = encode_prompts(builtin_model, prompts, [None] * len(prompts))
    config = default_cache_config("sd15").with_overrides({"mode": mode})
    psnrs = []
    for seed, cond in enumerate(conds):
        params = DenoiseParams(64, 64, steps=25, guidance_scale=5.0, seed=seed)
        plain = denoise(builtin_model, cond, params)
        job = Trajectory(builtin_model, cond, dataclasses.replace(params, cache=config))
        (preds,) = _run_together(builtin_model, [job])
        cache = job.cache
        assert cache.steps_cached >= 8 and cache.steps_computed + cache.steps_cached == 25
        assert not cache.decisions[0]  # nothing to compare with on the first step
        computed = [s for s, hit in enumerate(cache.decisions) if not hit]
        for step, hit in enumerate(cache.decisions):
            if hit and mode == "reuse":  # extrapolated from the last computed predictions
                s0, s1 = [s for s in computed if s < step][-2:]
                if config.order == 0:
                    assert torch.equal(preds[step], preds[s1])
                else:  # first order, in step units
                    slope = (preds[s1] - preds[s0]) / (s1 - s0)
                    torch.testing.assert_close(preds[step], preds[s1] + (step - s1) * slope)
        pixels = decode_latents(builtin_model, torch.cat([plain, job.latents]))
        psnrs.append(_psnr(pixels[0], pixels[1]))
    # a loose bound on two images; bench/bench_cache.py measures the mean over dozens of prompts
    assert min(psnrs) >= 24 and sum(psnrs) / len(psnrs) >= 28, psnrs


def test_window_and_run_limit(builtin_model):
    (cond,) = encode_prompts(builtin_model, [PROMPT], [None])
    config = FirstBlockCacheConfig(threshold=0.5, start=0.2, end=0.8, max_consecutive_hits=2)
    job = Trajectory(builtin_model, cond, DenoiseParams(64, 64, steps=20, seed=1, cache=config))
    _run_together(builtin_model, [job])
    hits = [i for i, hit in enumerate(job.cache.decisions) if hit]
    assert hits and all(4 <= i < 16 for i in hits)
    assert "111" not in "".join("1" if hit else "0" for hit in job.cache.decisions)


def test_batch_invariance_of_decisions_and_images(builtin_model):
    """One request, alone and amid others of other prompts, seeds, steps, samplers and caches."""
    prompts = [PROMPT, "a green square on a white background", "a black triangle on a yellow background",
               "a purple circle on an orange background", "a white square on a red background"]
    default = default_cache_config("sd15")
    params = [
        DenoiseParams(64, 64, steps=25, guidance_scale=5.0, seed=11, cache=default),  # the one we watch
        DenoiseParams(64, 64, steps=22, guidance_scale=5.0, seed=5, sampler="UniPC",
                      cache=default.with_overrides({"rule": "last_computed", "order": 0})),
        DenoiseParams(64, 64, steps=25, guidance_scale=4.0, seed=6,
                      cache=default.with_overrides({"rule": "accumulated", "order": 2, "run_growth": 0})),
        DenoiseParams(64, 64, steps=18, guidance_scale=7.0, seed=1, sampler="Euler a",
                      cache=default.with_overrides({"threshold": 0.3})),
        DenoiseParams(64, 64, steps=25, guidance_scale=5.0, seed=2, sampler="DPM++ 2M",
                      cache=default.with_overrides({"mode": "residual"})),
        DenoiseParams(64, 64, steps=12, guidance_scale=1.0, seed=3, cache=FirstBlockCacheConfig(threshold=0.0)),
        DenoiseParams(64, 64, steps=20, guidance_scale=5.0, seed=4, sampler="DDIM"),
    ]
    conds = encode_prompts(builtin_model, prompts, [None] * len(prompts))
    alone = Trajectory(builtin_model, conds[0], params[0])
    _run_together(builtin_model, [alone])
    crowd = [Trajectory(builtin_model, c, p) for c, p in zip(conds, params)]
    _run_together(builtin_model, crowd[1:3] + [crowd[0]] + crowd[3:])  # the watched one mid-batch
    watched = crowd[0]
    assert alone.cache.steps_cached >= 8
    assert watched.cache.decisions == alone.cache.decisions
    assert (watched.latents - alone.latents).abs().max().item() < 1e-4
    pixels = decode_latents(builtin_model, torch.cat([alone.latents, watched.latents])).astype(int)
    assert np.abs(pixels[0] - pixels[1]).max() <= 1


@pytest.mark.parametrize("overrides,field", [
    ({"threshold": -0.1}, "cache.threshold"),
    ({"threshold": float("nan")}, "cache.threshold"),
    ({"threshold": "0.2"}, "cache.threshold"),
    ({"start": 1.5}, "cache.start"),
    ({"start": 0.6, "end": 0.5}, "cache.end"),
    ({"max_consecutive_hits": 0}, "cache.max_consecutive_hits"),
    ({"max_consecutive_hits": 2.5}, "cache.max_consecutive_hits"),
    ({"mode": "approximate"}, "cache.mode"),
    ({"treshold": 0.1}, "cache.treshold"),
    ({"order": 3}, "cache.order"),
    ({"order": -1}, "cache.order"),
    ({"order": 1.0}, "cache.order"),
    ({"rule": "teacache"}, "cache.rule"),
    ({"run_growth": -1}, "cache.run_growth"),
    ({"run_growth": None}, "cache.run_growth"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(InvalidRequestError) as error:
        default_cache_config("sdxl").with_overrides(overrides)
    assert error.value.field == field


def test_defaults_per_family():
    assert default_cache_config("sdxl").threshold > default_cache_config("sd15").threshold and default_cache_config("sdxl").enabled
    assert default_cache_config("sd15").enabled
    assert not FirstBlockCacheConfig().enabled and not default_cache_config("sd15").with_overrides({"threshold": 0}).enabled
    assert default_cache_config("sd15").with_overrides({"max_consecutive_hits": None}).max_consecutive_hits is None
    with pytest.raises(InvalidRequestError):
        default_cache_config("flux")


def test_extrapolation_weights_in_step_units():
    assert extrapolation_weights([7], 9) == [1.0]
    assert extrapolation_weights([3, 4], 5) == [-1.0, 2.0]  # 2 * p1 - p0
    # computed at 2 and 5: two steps past 5 moves 2/3 of the last gap's change on
    torch.testing.assert_close(torch.tensor(extrapolation_weights([2, 5], 7)), torch.tensor([-2 / 3, 5 / 3]))
    # a parabola through three points is reproduced exactly
    steps, at = [1, 3, 4], 6
    value = sum(w * (s * s - 2 * s) for w, s in zip(extrapolation_weights(steps, at), steps))
    assert math.isclose(value, at * at - 2 * at)


def _fake_step(state: CacheState, value: torch.Tensor, residual: torch.Tensor) -> bool:
    """One step of ``state`` as ``FirstBlockCache.forward`` moves it, with a given head residual
    and tail value: decides, approximates or records; returns whether it skipped."""
    hit = False
    diff = None
    if state.may_skip():
        num, den = state.diff_terms(residual)
        diff = (num / den).item()
        hit = state.hits(diff)
    if hit:
        state.record_hit(residual, diff)
    else:
        state.record_computed(residual, value)
    return hit


@pytest.mark.parametrize("order", [1, 2])
def test_extrapolation_is_exact_on_a_polynomial_trajectory(order):
    """A tail value moving as a polynomial of the step, of the config's order, is extrapolated
    exactly over a run of hits, whatever the gaps between the computed steps."""
    config = FirstBlockCacheConfig(threshold=10.0, max_consecutive_hits=3, order=order)
    state = CacheState(config, 20)
    base, slope, curve = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    def value(step: int) -> torch.Tensor:
        return base + step * slope + (step * step * curve if order == 2 else 0)

    residual = torch.ones(2, 8, 8, 8)
    checked = 0
    for step in range(20):
        if state.may_skip() and len(state.history) == order + 1:
            torch.testing.assert_close(state.extrapolate(), value(step), rtol=1e-4, atol=1e-4)
            checked += 1
        _fake_step(state, value(step), residual)
    assert checked >= 8 and state.steps_cached >= 12
    # order 0 holds the last computed value
    held = CacheState(dataclasses.replace(config, order=0), 20)
    for step in range(3):
        _fake_step(held, value(step), residual)
    assert held.decisions == [False, True, True] and torch.equal(held.extrapolate(), value(0))


def test_accumulated_rule_sums_step_to_step_diffs():
    """TeaCache's rule: each step's diff is against the previous step's residual (skipped or
    not), summed since the last computed step; the step whose sum crosses the threshold is
    computed and the sum starts again. The last_computed rule on the same residuals compares
    with the computed step's residual, so a residual that walks back and forth keeps skipping."""
    base = torch.ones(1, 4, 4, 4)
    # residuals alternating 1.00 / 1.04: each step-to-step diff ~0.04, against the first ~0 or 0.04
    residuals = [base * (1.04 if k % 2 else 1.0) for k in range(9)]
    accumulated = CacheState(FirstBlockCacheConfig(threshold=0.1, rule="accumulated"), 9)
    last = CacheState(FirstBlockCacheConfig(threshold=0.1), 9)
    for r in residuals:
        _fake_step(accumulated, r, r)
        _fake_step(last, r, r)
    # sums: 0.04, 0.04 + 0.0385 = 0.0785, then + 0.04 = 0.1185 >= 0.1: computed; again from 0
    assert accumulated.decisions == [False, True, True, False, True, True, False, True, True]
    assert last.decisions == [False] + [True] * 8
    assert accumulated.accumulated == pytest.approx(0.04 + 0.04 / 1.04, rel=1e-5)


def test_run_growth_lengthens_each_run(builtin_model):
    """max_consecutive_hits 1, run_growth 1: runs of at most 1, 2, 3, ... skipped steps; the
    window still holds (a threshold no step reaches, so only the limits decide)."""
    (cond,) = encode_prompts(builtin_model, [PROMPT], [None])
    config = FirstBlockCacheConfig(threshold=100.0, start=0.2, end=0.96, max_consecutive_hits=1, run_growth=1)
    job = Trajectory(builtin_model, cond, DenoiseParams(64, 64, steps=25, seed=1, cache=config))
    _run_together(builtin_model, [job])
    assert "".join("x" if hit else "." for hit in job.cache.decisions) == ".....x.xx.xxx.xxxx.xxxxx."
