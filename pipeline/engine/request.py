"""The scheduler's record of a request in flight, and what the caller gets back.

As in vLLM's scheduler, the record holds no tensors: its batch key is computed once, when the
request is admitted, and picking a batch never touches the device. The tensors (sampler state,
latents, conditioning, cache) live in the request's ``Trajectory`` on the runner's side.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
import torch

from pipeline.denoise import Trajectory
from pipeline.errors import InvalidRequestError
from pipeline.lora_set import LoraSet
from pipeline.model import DiffusionModel

logger = logging.getLogger(__name__)
_ids = itertools.count()

OnStep = Callable[[int, int, np.ndarray | None], None]  # (steps done, of, preview) for progress


@dataclass(frozen=True)
class EngineResult:
    latents: torch.Tensor  # (1, C, h, w) on the CPU
    steps_computed: int
    steps_cached: int
    cache_decisions: tuple[bool, ...]  # per step: True where the cache skipped it
    queued_s: float  # from submission to the first step
    denoise_s: float  # from the first step to the last


@dataclass(eq=False)
class ActiveRequest:
    """The engine's record of one request in flight. Compared by identity (the engine looks
    records up in its list)."""

    model_name: str
    batch_key: Hashable  # only requests with equal keys share a forward
    adapters: LoraSet
    rows: int  # rows it adds to each forward
    steps_total: int
    future: asyncio.Future
    on_step: OnStep | None = None
    id: int = field(default_factory=lambda: next(_ids))
    steps_done: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    last_stepped: float = field(default_factory=time.perf_counter)

    @classmethod
    def admit(cls, model: DiffusionModel, trajectory: Trajectory, adapters: LoraSet,
              future: asyncio.Future, on_step: OnStep | None = None) -> ActiveRequest:
        """The record of a request just built: same weights (model and LoRA set), same latent
        shape and dtype make the batch key."""
        latents = trajectory.latents
        key = (id(model), adapters, tuple(latents.shape), latents.dtype)
        return cls(model.name, key, adapters, trajectory.rows, len(trajectory.timesteps), future,
                   on_step)

    @property
    def cancelled(self) -> bool:
        """Its caller went away: cancelling the task awaiting ``future`` cancels the future, at
        once, before that task runs again (a flag it set would come a loop turn late)."""
        return self.future.cancelled()

    @property
    def done(self) -> bool:
        return self.steps_done >= self.steps_total

    def advance(self, now: float, preview: np.ndarray | None = None) -> None:
        """One step of this request ran: the one place its record moves (and its caller hears)."""
        self.steps_done += 1
        self.last_stepped = now
        if self.on_step is not None:
            try:
                self.on_step(self.steps_done, self.steps_total, preview)
            except Exception:  # noqa: BLE001 - a progress listener must not stop the denoising
                logger.exception("on_step callback failed")

    def diverged(self, step: int) -> InvalidRequestError:
        """The caller's answer when its latents stopped being finite: the field to change is
        its LoRA weights when it has any (a LoRA at a huge weight blows up), else its guidance."""
        field, advice = (("loras", "lower the LoRA weights (or guidance_scale)") if self.adapters
                         else ("guidance_scale", "lower guidance_scale"))
        return InvalidRequestError(field, f"the denoising diverged (NaN or infinite latents after "
                                   f"step {step} of {self.steps_total}); {advice}")

    def result(self, trajectory: Trajectory, now: float) -> EngineResult:
        """What the caller gets back, from the record and its finished trajectory (whose
        latents the runner already put on the CPU)."""
        if trajectory.step_index != self.steps_done or trajectory.final is None:
            raise RuntimeError(f"request {self.id}: trajectory at step {trajectory.step_index} "
                               f"(final latents: {trajectory.final is not None}), record at "
                               f"{self.steps_done}")
        started = self.started or self.submitted
        decisions = trajectory.decisions
        return EngineResult(latents=trajectory.final,
                            steps_computed=self.steps_done - sum(decisions),
                            steps_cached=sum(decisions), cache_decisions=decisions,
                            queued_s=started - self.submitted, denoise_s=now - started)
