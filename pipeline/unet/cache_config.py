"""First Block Cache settings: one frozen dataclass per request, defaults per model family.

The bounds are declared once, as ``Annotated`` types that pydantic checks: here when a config is
built or merged with a request's fields, and in the HTTP API's request models, which reuse the
same types. No torch here, so the API layer imports it cheaply; every error names the field as
``cache.<name>``.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Mapping

from pydantic import ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from pipeline.errors import InvalidRequestError

CacheMode = Literal["residual", "reuse"]
CacheRule = Literal["last_computed", "accumulated"]
Threshold = Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)]
ScheduleFraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
RunLimit = Annotated[int, Strict(), Field(ge=1)]
RunGrowth = Annotated[int, Strict(), Field(ge=0)]
TaylorOrder = Annotated[int, Strict(), Field(ge=0, le=2)]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class FirstBlockCacheConfig:
    """How one request may skip UNet steps.

    threshold: skip a step when the head residual moved less than this, relatively (``rule``);
        0 turns the cache off (the result is then exact).
    start, end: the window of the schedule, as fractions of the steps, where skipping is allowed:
        step ``i`` of ``n`` may be skipped when ``start <= i / n < end``.
    max_consecutive_hits: at most this many skipped steps in a row (None: no limit) in the
        request's first run of skipped steps; each later run may be ``run_growth`` longer than
        the one before it could be.
    run_growth: how much the run limit grows with each run of skipped steps (0: it stays).
        The first steps shape the image and each step's share of the change shrinks as the
        noise level falls, so later runs may be longer: max_consecutive_hits 2 and run_growth 1
        allow runs of at most 2, 3, 4, ... steps.
    mode: ``reuse`` approximates the noise prediction from the last computed ones;
        ``residual`` (WaveSpeed's) approximates ``up_blocks output - head output`` from the last
        computed steps, adds it to this step's head output and runs the output layers.
    order: how that approximation extrapolates (TaylorSeer's and FORA's idea): 0 holds the last
        computed value as it is; 1 extrapolates linearly from the last two computed steps, 2
        quadratically from the last three, in step units (steps since the last computed one).
        Where fewer computed steps exist, the highest order they allow.
    rule: what the head residual is compared with. ``last_computed``: the residual ``r`` of
        this step against the one from the request's last computed step ``r_c``,
        ``diff = mean|r - r_c| / mean|r_c|``; ``accumulated`` (TeaCache's): the step-to-step
        changes ``mean|r_k - r_k-1| / mean|r_k-1|`` (each against the previous step's residual,
        computed or skipped) summed since the last computed step, this step's included.
    """

    threshold: Threshold = 0.0
    start: ScheduleFraction = 0.0
    end: ScheduleFraction = 1.0
    max_consecutive_hits: RunLimit | None = None
    run_growth: RunGrowth = 0
    mode: CacheMode = "reuse"
    order: TaylorOrder = 0
    rule: CacheRule = "last_computed"

    @field_validator("end")
    @classmethod
    def _window_in_order(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("start")
        if start is not None and end < start:
            raise ValueError(f"must not be before cache.start ({start})")
        return end

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def in_window(self, step_index: int, total_steps: int) -> bool:
        """Whether step ``step_index`` (0-based) of ``total_steps`` may be skipped at all."""
        return self.start * total_steps <= step_index < self.end * total_steps

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> FirstBlockCacheConfig:
        """This config with a request's fields (e.g. the native API's ``cache`` object) applied.

        Unknown keys are refused by name, so a typo cannot silently leave the cache at its default.
        """
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise InvalidRequestError("cache", "must be an object of cache settings")
        try:
            return type(self)(**{**dataclasses.asdict(self), **overrides})
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise InvalidRequestError(f"cache.{where}" if where else "cache", first["msg"]) from None


# Chosen from bench/bench_cache.py (see bench/RESULTS.md, "cache: First Block Cache sweep") and
# tests/unit/test_builtin_model_accuracy.py on the trained built-in model. Reuse beat residual
# at every skip pattern. The window and the run limit matter more than the threshold: with
# WaveSpeed's settings (start 0, no limit) accuracy fell from 97% to 86% at 0.15 and the worst
# image to 15 dB, because the layout and colours form in the first steps and the reference stays
# put over a run of hits. Never skipping the first fifth of the schedule kept accuracy at the
# uncached level (312 images, 20 steps: start 0.1 lost 2.6 points, start 0.2 none).
# Past 2x (issue 16; bench_cache, 36 prompts, 25 Euler steps): where the skips go matters more
# than how many. An early step moves the image far more than a late one (the sampler's step
# shrinks with the noise level), so runs of hits grow as the schedule goes on: at most 2, then
# 3, 4, 5 (run_growth 1) skips 16 of 25 steps, 2.06x, 39 dB mean and 29 dB worst vs uncached,
# accuracy unchanged; the fixed limit of 2 skipped 13 (1.71x), and a fixed limit of 3 from step
# 3 or 4 skipped the same 16 at 35-37 dB mean and 20-24 dB worst (trial sweeps). With these run
# limits the threshold rarely decides on the built-in model (the last_computed rule decides
# alike at 0.3); the accumulated rule (TeaCache's) is kept as the stricter one where the head
# does move: on random SDXL it computes one step more (15 vs 16 skipped).
# Lost: extrapolation (order 1, TaylorSeer/FORA): 23 dB worst with Euler, and with the
# multistep samplers, which extrapolate from past predictions themselves, it broke images (trial
# sweeps: UniPC 26-31 dB mean, 10-17 dB worst; DPM++ 2M 15 dB worst); residual mode 3 dB lower;
# computing the last tenth (end 0.9) 1.84x for +2 dB. SDXL's threshold stays above SD1.5's in
# the ratio of WaveSpeed's (0.2 vs 0.15).
_DEFAULTS: dict[str, FirstBlockCacheConfig] = {
    "sd15": FirstBlockCacheConfig(threshold=0.3, start=0.2, max_consecutive_hits=2, run_growth=1,
                                  mode="reuse", rule="accumulated"),
    "sdxl": FirstBlockCacheConfig(threshold=0.4, start=0.2, max_consecutive_hits=2, run_growth=1,
                                  mode="reuse", rule="accumulated"),
}


def default_cache_config(family: str) -> FirstBlockCacheConfig:
    """The cache a request of this model family gets when it does not say otherwise."""
    try:
        return _DEFAULTS[family]
    except KeyError:
        raise InvalidRequestError("model", f"no cache defaults for model family {family!r}") from None
