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
Threshold = Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)]
ScheduleFraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
RunLimit = Annotated[int, Strict(), Field(ge=1)]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class FirstBlockCacheConfig:
    """How one request may skip UNet steps.

    threshold: skip a step when the head residual moved less than this, relatively, since the
        request's last computed step; 0 turns the cache off (the result is then exact).
    start, end: the window of the schedule, as fractions of the steps, where skipping is allowed:
        step ``i`` of ``n`` may be skipped when ``start <= i / n < end``.
    max_consecutive_hits: at most this many skipped steps in a row (None: no limit).
    mode: ``reuse`` returns the last computed noise prediction; ``residual`` (WaveSpeed's) adds
        the cached ``up_blocks output - head output`` to this step's head output and runs the
        output layers.
    """

    threshold: Threshold = 0.0
    start: ScheduleFraction = 0.0
    end: ScheduleFraction = 1.0
    max_consecutive_hits: RunLimit | None = None
    mode: CacheMode = "reuse"

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
# put over a run of hits. Never skipping the first fifth of the schedule and at most 2 skips in
# a row kept accuracy at the uncached level (312 images, 20 steps: start 0.1 lost 2.6 points,
# start 0.2 none) with about half the steps skipped.
_DEFAULTS: dict[str, FirstBlockCacheConfig] = {
    "sd15": FirstBlockCacheConfig(threshold=0.15, start=0.2, max_consecutive_hits=2, mode="reuse"),
    # WaveSpeed's SDXL threshold at 25 steps; window and run limit as measured for SD1.5
    "sdxl": FirstBlockCacheConfig(threshold=0.2, start=0.2, max_consecutive_hits=2, mode="reuse"),
}


def default_cache_config(family: str) -> FirstBlockCacheConfig:
    """The cache a request of this model family gets when it does not say otherwise."""
    try:
        return _DEFAULTS[family]
    except KeyError:
        raise InvalidRequestError("model", f"no cache defaults for model family {family!r}") from None
