"""First Block Cache settings: one frozen dataclass per request, defaults per model family.

Kept apart from the cache itself (no torch import) so that the API layer can validate and
merge a request's ``cache`` fields cheaply; every error names the field as ``cache.<name>``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from pipeline.errors import InvalidRequestError

CacheMode = Literal["residual", "reuse"]
CACHE_MODES: tuple[str, ...] = ("residual", "reuse")


@dataclass(frozen=True)
class CacheConfig:
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

    threshold: float = 0.0
    start: float = 0.0
    end: float = 1.0
    max_consecutive_hits: int | None = None
    mode: CacheMode = "reuse"

    def __post_init__(self) -> None:
        _check_fraction("threshold", self.threshold, upper=None)
        _check_fraction("start", self.start)
        _check_fraction("end", self.end)
        if self.end < self.start:
            raise InvalidRequestError("cache.end", f"must not be before cache.start ({self.start})")
        hits = self.max_consecutive_hits
        if hits is not None and (isinstance(hits, bool) or not isinstance(hits, int) or hits < 1):
            raise InvalidRequestError("cache.max_consecutive_hits",
                                      f"must be null (no limit) or an integer >= 1, not {hits!r}")
        if self.mode not in CACHE_MODES:
            raise InvalidRequestError("cache.mode", f"must be one of {', '.join(CACHE_MODES)}, "
                                                    f"not {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def in_window(self, step_index: int, total_steps: int) -> bool:
        """Whether step ``step_index`` (0-based) of ``total_steps`` may be skipped at all."""
        return self.start * total_steps <= step_index < self.end * total_steps

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> CacheConfig:
        """This config with a request's fields (e.g. the native API's ``cache`` object) applied.

        Unknown keys are refused by name, so a typo cannot silently leave the cache at its default.
        """
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise InvalidRequestError("cache", "must be an object of cache settings")
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise InvalidRequestError(f"cache.{key}", f"unknown setting; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **dict(overrides))


def _check_fraction(name: str, value: object, upper: float | None = 1.0) -> None:
    field = f"cache.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(field, f"must be a finite number, not {value!r}")
    if value < 0 or (upper is not None and value > upper):
        bounds = f"between 0 and {upper}" if upper is not None else ">= 0"
        raise InvalidRequestError(field, f"must be {bounds}, not {value!r}")


# Chosen from bench/bench_cache.py (see bench/RESULTS.md, "cache: First Block Cache sweep") and
# tests/unit/test_builtin_model_accuracy.py on the trained built-in model. Reuse beat residual
# at every skip pattern. The window and the run limit matter more than the threshold: with
# WaveSpeed's settings (start 0, no limit) accuracy fell from 97% to 86% at 0.15 and the worst
# image to 15 dB, because the layout and colours form in the first steps and the reference stays
# put over a run of hits. Never skipping the first fifth of the schedule and at most 2 skips in
# a row kept accuracy at the uncached level (312 images, 20 steps: start 0.1 lost 2.6 points,
# start 0.2 none) with about half the steps skipped.
_DEFAULTS: dict[str, CacheConfig] = {
    "sd15": CacheConfig(threshold=0.15, start=0.2, max_consecutive_hits=2, mode="reuse"),
    # WaveSpeed's SDXL threshold at 25 steps; window and run limit as measured for SD1.5
    "sdxl": CacheConfig(threshold=0.2, start=0.2, max_consecutive_hits=2, mode="reuse"),
}


def default_cache_config(family: str) -> CacheConfig:
    """The cache a request of this model family gets when it does not say otherwise."""
    try:
        return _DEFAULTS[family]
    except KeyError:
        raise InvalidRequestError("model", f"no cache defaults for model family {family!r}") from None
