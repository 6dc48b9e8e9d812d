"""Samplers and schedules by their AUTOMATIC1111 names, built on diffusers' scheduler classes.

A request names a sampler (the solver: ``DPM++ 2M``) and a schedule (where its noise levels lie:
``Karras``). A1111 (>= 1.9) sends them apart, as ``sampler_name`` and ``scheduler``; older clients
send one name (``DPM++ 2M Karras``), accepted as an alias of the pair (``resolve_sampler``).

``make_sampler`` builds a request's diffusers scheduler with its timesteps set. A schedule is one
of diffusers' own config options where the sampler's class has it (``use_karras_sigmas``,
``timestep_spacing``...); otherwise, and for the schedules diffusers has no option for (KL
Optimal, Polyexponential, Align Your Steps), explicit sigmas, or the timesteps where they lie,
given to ``set_timesteps`` where the class takes them. A combination neither can express is
refused, naming ``scheduler``.

Each request gets its own scheduler instance: diffusers schedulers keep state (step index,
multistep history), so one instance must never serve two requests.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Sampler:
    """A sampler as A1111 names it: a diffusers scheduler class and the config it runs with."""

    scheduler_class: type[SchedulerMixin]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # A1111's (``k_dpmpp_2m``...), accepted as names too
    options: Mapping[str, str] = field(default_factory=dict)  # as A1111 lists them
    # which of sigmas/timesteps set_timesteps takes explicitly; None: as its signature says
    explicit: tuple[str, ...] | None = None

    def takes(self) -> tuple[str, ...]:
        """``sigmas`` and/or ``timesteps``, where ``set_timesteps`` takes them explicitly."""
        if self.explicit is not None:
            return self.explicit
        accepted = inspect.signature(self.scheduler_class.set_timesteps).parameters
        return tuple(name for name in ("sigmas", "timesteps") if name in accepted)


_SECOND_ORDER = {"second_order": "True"}  # two UNet evaluations per step
_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler(EulerDiscreteScheduler, aliases=("k_euler",)),
    "Euler a": Sampler(EulerAncestralScheduler, aliases=("k_euler_a", "k_euler_ancestral")),
    "DPM++ 2M": Sampler(DPMSolverMultistepScheduler, _DPMPP, aliases=("k_dpmpp_2m",)),
    "DDIM": Sampler(DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}, aliases=("ddim",)),
    # its sigmas= is for flow-matching models only
    "UniPC": Sampler(UniPCMultistepScheduler, aliases=("unipc",), explicit=()),
    # a Brownian tree seeded with the request's seed (``make_sampler``)
    "DPM++ SDE": Sampler(DPMSolverSDEScheduler, aliases=("k_dpmpp_sde",),
                         options={**_SECOND_ORDER, "brownian_noise": "True"}),
    "DPM++ 2M SDE": Sampler(DPMSolverMultistepScheduler, _SDE, aliases=("k_dpmpp_2m_sde",)),
    "DPM++ 2M SDE Heun": Sampler(DPMSolverMultistepScheduler, {**_SDE, "solver_type": "heun"},
                                 aliases=("k_dpmpp_2m_sde_heun",), options={"solver_type": "heun"}),
    "DPM++ 3M SDE": Sampler(DPMSolverMultistepScheduler, {**_SDE, "solver_order": 3},
                            aliases=("k_dpmpp_3m_sde",)),
    "Heun": Sampler(HeunDiscreteScheduler, aliases=("k_heun",), options=_SECOND_ORDER),
    "LMS": Sampler(LMSDiscreteScheduler, aliases=("k_lms",)),
    "DPM2": Sampler(KDPM2DiscreteScheduler, aliases=("k_dpm_2",), options=_SECOND_ORDER),
    "DPM2 a": Sampler(KDPM2AncestralDiscreteScheduler, aliases=("k_dpm_2_a",), options=_SECOND_ORDER),
    "PLMS": Sampler(PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}, aliases=("plms",)),
}
DEFAULT_SAMPLER = "Euler"


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


@dataclass(frozen=True)
class Schedule:
    """A schedule as A1111 (>= 1.9) lists it: ``key`` (``karras``) and ``label`` (``Karras``)."""

    key: str
    label: str
    option: Mapping[str, Any] | None = None  # the diffusers config that gives it
    sigmas: SigmaSchedule | None = None  # else: explicit sigmas
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False
    families: tuple[str, ...] | None = None  # None: any family
    as_timesteps: bool = True  # explicit sigmas may go as the whole timesteps where they lie

    def names(self) -> tuple[str, ...]:
        return (self.label, self.key, *self.aliases)


_SCHEDULES = (
    Schedule("automatic", "Automatic", {}),  # the sampler's own, on the model's config
    Schedule("uniform", "Uniform", {"timestep_spacing": "linspace"}, need_inner_model=True),
    Schedule("karras", "Karras", {"use_karras_sigmas": True}, default_rho=7.0),
    Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}),
    # as whole timesteps, its dense low end puts two steps on one timestep from 29 steps on
    Schedule("polyexponential", "Polyexponential", sigmas=_polyexponential, default_rho=1.0,
             as_timesteps=False),
    Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, aliases=("SGMUniform",),
             need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal", sigmas=_kl_optimal),
    Schedule("align_your_steps", "Align Your Steps", sigmas=_align_your_steps,
             families=tuple(_AYS_SIGMAS)),
    Schedule("simple", "Simple", {"timestep_spacing": "trailing"}, need_inner_model=True),
    Schedule("normal", "Normal", {"timestep_spacing": "linspace"}, need_inner_model=True),
    Schedule("ddim", "DDIM", {"timestep_spacing": "leading"}, need_inner_model=True),
    Schedule("beta", "Beta", {"use_beta_sigmas": True}, need_inner_model=True),
)
SCHEDULES: dict[str, Schedule] = {schedule.label: schedule for schedule in _SCHEDULES}
DEFAULT_SCHEDULE = "Automatic"

_SAMPLER_NAMES = {alias.lower(): name for name, sampler in SAMPLERS.items()
                  for alias in (name, *sampler.aliases)}
_SCHEDULE_NAMES = {alias.lower(): schedule.label for schedule in _SCHEDULES
                   for alias in schedule.names()}


def canonical_sampler_name(name: str) -> str:
    """The A1111 spelling of sampler ``name`` or one of its aliases (matched
    case-insensitively), or InvalidRequestError naming ``sampler``."""
    try:
        return _SAMPLER_NAMES[name.strip().lower()]
    except KeyError:
        raise InvalidRequestError(
            "sampler", f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def canonical_schedule_name(name: str) -> str:
    """The label of schedule ``name``, given as A1111's label (``Karras``), key (``karras``) or
    alias, matched case-insensitively; or InvalidRequestError naming ``scheduler``."""
    try:
        return _SCHEDULE_NAMES[name.strip().lower()]
    except KeyError:
        raise InvalidRequestError(
            "scheduler", f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


def _split(name: str) -> tuple[str, str | None]:
    """A sampler name, or an older combined one (``DPM++ 2M Karras``): the sampler, and the
    schedule the name carries (None: none)."""
    lowered = name.strip().lower()
    if lowered in _SAMPLER_NAMES:
        return _SAMPLER_NAMES[lowered], None
    for alias, label in _SCHEDULE_NAMES.items():
        prefix = lowered.removesuffix(" " + alias)
        if prefix != lowered and prefix.strip() in _SAMPLER_NAMES:
            return _SAMPLER_NAMES[prefix.strip()], label
    return canonical_sampler_name(name), None  # raises, naming ``sampler``


def resolve_sampler(sampler: str | None, schedule: str | None = None,
                    family: str | None = None) -> tuple[str, str]:
    """The (sampler, schedule) a request asks for, in their A1111 spellings, checked to be
    served together (for ``family``, where given). ``sampler`` may be an older combined name
    (``DPM++ 2M Karras``): its schedule stands where ``schedule`` is absent, ``Automatic`` or
    the same; another is refused."""
    name, implied = _split(sampler or DEFAULT_SAMPLER)
    chosen = canonical_schedule_name(schedule) if schedule else DEFAULT_SCHEDULE
    if implied is not None and chosen not in (DEFAULT_SCHEDULE, implied):
        raise InvalidRequestError("scheduler", f"sampler {sampler!r} names the {implied} schedule, "
                                  f"the scheduler asks for {chosen}: give one")
    chosen = implied or chosen
    _delivery(name, chosen, family)
    return name, chosen


def _delivery(sampler: str, schedule: str, family: str | None) -> str | None:
    """How ``schedule`` reaches ``sampler``'s scheduler: None as a config option, else
    ``sigmas`` or ``timesteps`` given to ``set_timesteps``; InvalidRequestError naming
    ``scheduler`` where neither can."""
    chosen, entry = SCHEDULES[schedule], SAMPLERS[sampler]
    if chosen.families is not None and family is not None and family not in chosen.families:
        raise InvalidRequestError("scheduler", f"{schedule} has no schedule for {family} models; it "
                                  f"has for {', '.join(chosen.families)}")
    if chosen.option is not None:
        accepted = inspect.signature(entry.scheduler_class.__init__).parameters
        if all(key in accepted for key in chosen.option):
            return None
    takes = [way for way in entry.takes() if way == "sigmas" or chosen.as_timesteps]
    if takes:
        return takes[0]
    explicit = "explicit sigmas or timesteps" if chosen.as_timesteps else "explicit sigmas"
    lacks = (f"takes neither {', '.join(chosen.option)} nor {explicit}" if chosen.option
             else f"does not take {explicit}")
    raise InvalidRequestError(
        "scheduler", f"sampler {sampler!r} does not take the {schedule} schedule (its diffusers "
        f"scheduler, {entry.scheduler_class.__name__}, {lacks})")


def _explicit_sigmas(scheduler: SchedulerMixin, schedule: Schedule, steps: int,
                     family: str | None, config: Mapping[str, Any]) -> np.ndarray:
    """``steps + 1`` sigmas of ``schedule`` on the model's noise schedule: computed, or, for a
    config option the sampler's class lacks, as diffusers' Euler sets them with that option."""
    if schedule.sigmas is not None:
        return schedule.sigmas(train_sigmas(scheduler), steps, family)
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
    delivery = _delivery(sampler, schedule, family)
    overrides = dict(entry.overrides)
    if delivery is None:
        overrides.update(chosen.option)
    if entry.scheduler_class is DPMSolverSDEScheduler:
        overrides["noise_sampler_seed"] = seed
    scheduler = entry.scheduler_class.from_config(dict(model_scheduler_config), **overrides)
    if delivery is None:
        return scheduler, {"num_inference_steps": steps}
    sigmas = _explicit_sigmas(scheduler, chosen, steps, family, model_scheduler_config)
    if delivery == "sigmas":
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
