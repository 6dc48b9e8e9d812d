"""What a caller submits to the engine, what it gets back, and the engine's per-request record."""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from pipeline.conditioning import Conditioning
from pipeline.denoise import DenoiseJob, DenoiseParams
from pipeline.lora import LoraSet
from pipeline.model import DiffusionModel

_ids = itertools.count()


@dataclass
class EngineRequest:
    """One image to denoise. ``adapters`` names the LoRA set; only equal sets share a forward."""

    conditioning: Conditioning
    params: DenoiseParams
    adapters: LoraSet = ()
    on_step: Callable[[int, int], None] | None = None  # (steps done, steps total), for progress


@dataclass
class EngineResult:
    latents: torch.Tensor  # (1, C, h, w) on the CPU
    steps_computed: int
    steps_cached: int
    cache_decisions: tuple[bool, ...]  # per step: True where the cache skipped it
    queued_s: float  # from submission to the first step
    denoise_s: float  # from the first step to the last


@dataclass(eq=False)
class ActiveRequest:
    """The engine's record of a request in flight. Compared by identity: field equality would
    compare tensors (and raise) whenever the engine looks a request up in its list."""

    request: EngineRequest
    model: DiffusionModel  # held, not looked up per step: a model evicted meanwhile stays usable
    job: DenoiseJob
    future: asyncio.Future
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    last_stepped: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    forwards: int = 0

    @property
    def batch_key(self) -> Hashable:
        """Requests share a UNet forward only if this is equal: same weights, same tensor shape."""
        latents = self.job.latents
        return (id(self.model), self.request.adapters, tuple(latents.shape), latents.dtype)
