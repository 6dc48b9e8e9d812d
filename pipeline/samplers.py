"""Samplers and schedules built on diffusers' scheduler classes, from ``pipeline.sampler_names``.

``sampler_names`` holds the A1111 names, what is served together and how (without importing
diffusers, for the HTTP Ingress); this module turns a checked (sampler, schedule) into a diffusers
scheduler. ``make_sampler`` builds a request's scheduler with its timesteps set. A schedule is one
of diffusers' own config options where the sampler's class has it (``use_karras_sigmas``,
``timestep_spacing``...); otherwise, and for the schedules diffusers has no option for (KL
Optimal, Polyexponential, Align Your Steps), explicit sigmas, or the timesteps where they lie,
given to ``set_timesteps`` where the class takes them. A combination neither can express is
refused, naming ``scheduler``.

Each request gets its own scheduler instance: diffusers schedulers keep state (step index,
multistep history), so one instance must never serve two requests.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
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
    UniPCMultistepScheduler,
)
from diffusers.schedulers import AysSchedules
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.errors import InvalidRequestError
from pipeline.sampler_names import DEFAULT_SCHEDULE, SAMPLERS, SCHEDULES, Schedule, delivery, resolve_sampler


def _sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Where ``sigmas`` lie on the model's schedule, as (fractional) training timesteps:
    linear in log sigma between neighbouring timesteps, as diffusers' ``_sigma_to_t``."""
    log_sigmas = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    return np.interp(log_sigmas, np.log(train_sigmas), np.arange(len(train_sigmas), dtype=np.float64))


def train_sigmas(scheduler: SchedulerMixin) -> np.ndarray:
    """The model's noise level at each training timestep (increasing with the timestep)."""
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


class EulerAncestralScheduler(EulerAncestralDiscreteScheduler):
    """diffusers' Euler a, also taking explicit ``sigmas`` as its Euler does.

    diffusers' ``EulerAncestralDiscreteScheduler`` has neither ``use_karras_sigmas`` nor a
    ``sigmas=`` argument, so A1111's common ``Euler a`` + ``Karras`` could not be served. With
    ``sigmas`` (``steps + 1`` of them, the last the final one) its timesteps are where those
    sigmas lie on the model's schedule, as ``EulerDiscreteScheduler.set_timesteps(sigmas=...)``
    maps them; without, it is diffusers' own, unchanged.
    """

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None) -> None:
        if sigmas is None:
            super().set_timesteps(num_inference_steps, device)
            return
        sigmas = np.asarray(sigmas, dtype=np.float32)
        self.num_inference_steps = len(sigmas) - 1
        timesteps = _sigma_to_t(sigmas[:-1], train_sigmas(self)).astype(np.float32)
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self.sigmas = torch.from_numpy(sigmas)  # on the CPU, as diffusers keeps them
        self._step_index = None
        self._begin_index = None


# the classes sampler_names names, by name (tests/unit/test_sampler_names.py checks its facts)
SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {cls.__name__: cls for cls in (
    EulerDiscreteScheduler, EulerAncestralScheduler, DPMSolverMultistepScheduler, DDIMScheduler,
    UniPCMultistepScheduler, DPMSolverSDEScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler,
    KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, PNDMScheduler)}


# Explicit schedules: (the model's training sigmas, steps, family) -> steps + 1 sigmas, the last
# the final one, as k-diffusion (A1111) computes them over the model's whole sigma range.
SigmaSchedule = Callable[[np.ndarray, int, str | None], np.ndarray]


def _polyexponential(train: np.ndarray, steps: int, family: str | None, rho: float = 1.0) -> np.ndarray:
    ramp = np.linspace(1, 0, steps) ** rho
    log_min, log_max = np.log(train[0]), np.log(train[-1])
    return np.append(np.exp(ramp * (log_max - log_min) + log_min), 0.0)


def _kl_optimal(train: np.ndarray, steps: int, family: str | None) -> np.ndarray:
    """KL Optimal (Sabour et al. 2024) as A1111: ``steps + 1`` sigmas ending at sigma_min."""
    alpha_min, alpha_max = np.arctan(train[0]), np.arctan(train[-1])
    fraction = np.arange(steps + 1) / steps
    return np.tan(fraction * alpha_min + (1.0 - fraction) * alpha_max)


_AYS_SIGMAS = {"sd15": "StableDiffusionSigmas", "sdxl": "StableDiffusionXLSigmas"}


def _align_your_steps(train: np.ndarray, steps: int, family: str | None) -> np.ndarray:
    """Align Your Steps' 10-step schedule for the family (diffusers' ``AysSchedules``),
    log-linearly interpolated to ``steps`` as the AYS paper does."""
    published = np.asarray(AysSchedules[_AYS_SIGMAS[family]][:-1], dtype=np.float64)  # less the final 0
    where = np.linspace(0, 1, len(published))
    log_sigmas = np.interp(np.linspace(0, 1, steps), where, np.log(published[::-1]))
    return np.append(np.exp(log_sigmas)[::-1], 0.0)


# the schedules sampler_names marks explicit_sigmas, by label
SIGMA_SCHEDULES: dict[str, SigmaSchedule] = {
    "Polyexponential": _polyexponential,
    "KL Optimal": _kl_optimal,
    "Align Your Steps": _align_your_steps,
}


def _explicit_sigmas(scheduler: SchedulerMixin, schedule: Schedule, steps: int,
                     family: str | None, config: Mapping[str, Any]) -> np.ndarray:
    """``steps + 1`` sigmas of ``schedule`` on the model's noise schedule: computed, or, for a
    config option the sampler's class lacks, as diffusers' Euler sets them with that option."""
    if schedule.explicit_sigmas:
        return SIGMA_SCHEDULES[schedule.label](train_sigmas(scheduler), steps, family)
    reference = EulerDiscreteScheduler.from_config(config, **schedule.option)
    reference.set_timesteps(steps)
    return reference.sigmas.double().numpy()


def _as_timesteps(sigmas: np.ndarray, scheduler: SchedulerMixin, sampler: str,
                  schedule: str) -> list[int]:
    """The whole training timesteps where ``sigmas`` (less the final one) lie, for a class
    that takes timesteps only; refused where two steps would round to one timestep."""
    timesteps = np.round(_sigma_to_t(sigmas[:-1], train_sigmas(scheduler))).astype(np.int64)
    if np.any(np.diff(timesteps) >= 0):
        raise InvalidRequestError(
            "scheduler", f"{schedule} at {len(timesteps)} steps puts two steps on one timestep for "
            f"sampler {sampler!r}, which takes whole timesteps only: use fewer steps or Euler")
    return timesteps.tolist()


def scheduler_setup(sampler: str, schedule: str, model_scheduler_config: Mapping[str, Any],
                    steps: int, family: str | None = None,
                    seed: int | None = None) -> tuple[SchedulerMixin, dict[str, Any]]:
    """A fresh scheduler for (``sampler``, ``schedule``) on the model's own noise schedule, and
    what its ``set_timesteps`` is to be given (``num_inference_steps``, ``sigmas`` or
    ``timesteps``; a diffusers pipeline takes the same). ``seed`` seeds the Brownian tree of
    ``DPM++ SDE``, the one sampler whose noise does not come from the request's generator."""
    sampler, schedule = resolve_sampler(sampler, schedule, family)
    entry, chosen = SAMPLERS[sampler], SCHEDULES[schedule]
    way, cls = delivery(sampler, schedule, family), SCHEDULER_CLASSES[entry.scheduler_class.name]
    overrides = dict(entry.overrides)
    if way is None:
        overrides.update(chosen.option)
    if cls is DPMSolverSDEScheduler:
        overrides["noise_sampler_seed"] = seed
    scheduler = cls.from_config(dict(model_scheduler_config), **overrides)
    if way is None:
        return scheduler, {"num_inference_steps": steps}
    sigmas = _explicit_sigmas(scheduler, chosen, steps, family, model_scheduler_config)
    if way == "sigmas":
        return scheduler, {"sigmas": sigmas.astype(np.float32).tolist()}
    return scheduler, {"timesteps": _as_timesteps(sigmas, scheduler, sampler, schedule)}


def make_sampler(sampler: str, schedule: str, model_scheduler_config: Mapping[str, Any], steps: int,
                 device: torch.device | str | None = None, family: str | None = None,
                 seed: int | None = None) -> SchedulerMixin:
    """A request's own scheduler for (``sampler``, ``schedule``), its timesteps set for
    ``steps`` steps on ``device``."""
    scheduler, timesteps = scheduler_setup(sampler, schedule, model_scheduler_config, steps, family, seed)
    scheduler.set_timesteps(**timesteps, device=device)
    return scheduler


def make_scheduler(name: str, model_scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler of sampler ``name`` (or a combined name whose schedule is a config
    option, ``DPM++ 2M Karras``) on the model's noise schedule, its timesteps not set."""
    scheduler, timesteps = scheduler_setup(name, DEFAULT_SCHEDULE, model_scheduler_config, 1)
    if "num_inference_steps" not in timesteps:
        raise ValueError(f"{name!r}: its schedule needs explicit sigmas; use make_sampler")
    return scheduler
