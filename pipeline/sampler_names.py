"""Samplers and schedules by their AUTOMATIC1111 names: the table the API validates against.

A request names a sampler (the solver: ``DPM++ 2M``) and a schedule (where its noise levels lie:
``Karras``). A1111 (>= 1.9) sends them apart, as ``sampler_name`` and ``scheduler``; older clients
send one name (``DPM++ 2M Karras``), accepted as an alias of the pair (``resolve_sampler``).

This module imports neither torch nor diffusers (importing a diffusers scheduler costs seconds of
CPU), so the HTTP Ingress can check names and refuse a combination before any model runs. What
it needs to know of diffusers' scheduler classes (the class, by name; which schedule config
options its ``__init__`` takes; whether its ``set_timesteps`` takes explicit sigmas or timesteps)
is written here as static facts, and ``tests/unit/test_sampler_names.py`` checks them against the
classes, so a diffusers upgrade that changes them fails that test rather than a request.
``pipeline.samplers`` builds the schedulers from this table.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import InvalidRequestError


@dataclass(frozen=True)
class SchedulerClass:
    """A scheduler class by name (diffusers', or ``pipeline.samplers``' own), and what its
    signatures take, as far as choosing how a schedule reaches it needs."""

    name: str
    accepts: frozenset[str]  # the schedule config options (OPTION_KEYS) its __init__ takes
    takes: tuple[str, ...]  # of ("sigmas", "timesteps"), those its set_timesteps takes


_SPACING = frozenset({"timestep_spacing"})
_EVERY_OPTION = _SPACING | {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"}
_EULER = SchedulerClass("EulerDiscreteScheduler", _EVERY_OPTION, ("sigmas", "timesteps"))
_EULER_A = SchedulerClass("EulerAncestralScheduler", _SPACING, ("sigmas",))  # pipeline.samplers'
_DPM_MULTISTEP = SchedulerClass("DPMSolverMultistepScheduler", _EVERY_OPTION, ("timesteps",))
_DDIM = SchedulerClass("DDIMScheduler", _SPACING, ())
_UNIPC = SchedulerClass("UniPCMultistepScheduler", _EVERY_OPTION, ("sigmas",))
_DPM_SDE = SchedulerClass("DPMSolverSDEScheduler", _EVERY_OPTION, ())
_HEUN = SchedulerClass("HeunDiscreteScheduler", _EVERY_OPTION, ("timesteps",))
_LMS = SchedulerClass("LMSDiscreteScheduler", _EVERY_OPTION, ())
_DPM2 = SchedulerClass("KDPM2DiscreteScheduler", _EVERY_OPTION, ())
_DPM2_A = SchedulerClass("KDPM2AncestralDiscreteScheduler", _EVERY_OPTION, ())
_PNDM = SchedulerClass("PNDMScheduler", _SPACING, ())


@dataclass(frozen=True)
class Sampler:
    """A sampler as A1111 names it: a scheduler class and the config it runs with."""

    scheduler_class: SchedulerClass
    overrides: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # A1111's (``k_dpmpp_2m``...), accepted as names too
    options: Mapping[str, str] = field(default_factory=dict)  # as A1111 lists them
    # which of sigmas/timesteps set_timesteps is given explicitly; None: all its class takes
    explicit: tuple[str, ...] | None = None

    def takes(self) -> tuple[str, ...]:
        """``sigmas`` and/or ``timesteps``, where ``set_timesteps`` is given them explicitly."""
        return self.scheduler_class.takes if self.explicit is None else self.explicit


_SECOND_ORDER = {"second_order": "True"}  # two UNet evaluations per step
_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler(_EULER, aliases=("k_euler",)),
    "Euler a": Sampler(_EULER_A, aliases=("k_euler_a", "k_euler_ancestral")),
    "DPM++ 2M": Sampler(_DPM_MULTISTEP, _DPMPP, aliases=("k_dpmpp_2m",)),
    "DDIM": Sampler(_DDIM, {"clip_sample": False, "set_alpha_to_one": False}, aliases=("ddim",)),
    # its sigmas= is for flow-matching models only
    "UniPC": Sampler(_UNIPC, aliases=("unipc",), explicit=()),
    # a Brownian tree seeded with the request's seed (``pipeline.samplers.scheduler_setup``)
    "DPM++ SDE": Sampler(_DPM_SDE, aliases=("k_dpmpp_sde",),
                         options={**_SECOND_ORDER, "brownian_noise": "True"}),
    "DPM++ 2M SDE": Sampler(_DPM_MULTISTEP, _SDE, aliases=("k_dpmpp_2m_sde",)),
    "DPM++ 2M SDE Heun": Sampler(_DPM_MULTISTEP, {**_SDE, "solver_type": "heun"},
                                 aliases=("k_dpmpp_2m_sde_heun",), options={"solver_type": "heun"}),
    "DPM++ 3M SDE": Sampler(_DPM_MULTISTEP, {**_SDE, "solver_order": 3}, aliases=("k_dpmpp_3m_sde",)),
    "Heun": Sampler(_HEUN, aliases=("k_heun",), options=_SECOND_ORDER),
    "LMS": Sampler(_LMS, aliases=("k_lms",)),
    "DPM2": Sampler(_DPM2, aliases=("k_dpm_2",), options=_SECOND_ORDER),
    "DPM2 a": Sampler(_DPM2_A, aliases=("k_dpm_2_a",), options=_SECOND_ORDER),
    "PLMS": Sampler(_PNDM, {"skip_prk_steps": True, "set_alpha_to_one": False}, aliases=("plms",)),
}
DEFAULT_SAMPLER = "Euler"


@dataclass(frozen=True)
class Schedule:
    """A schedule as A1111 (>= 1.9) lists it: ``key`` (``karras``) and ``label`` (``Karras``)."""

    key: str
    label: str
    option: Mapping[str, Any] | None  # the diffusers config that gives it; None: explicit sigmas
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False
    families: tuple[str, ...] | None = None  # None: any family
    as_timesteps: bool = True  # explicit sigmas may go as the whole timesteps where they lie

    @property
    def explicit_sigmas(self) -> bool:
        """No diffusers option gives it: ``pipeline.samplers`` computes its sigmas."""
        return self.option is None

    def names(self) -> tuple[str, ...]:
        return (self.label, self.key, *self.aliases)


_SCHEDULES = (
    Schedule("automatic", "Automatic", {}),  # the sampler's own, on the model's config
    Schedule("uniform", "Uniform", {"timestep_spacing": "linspace"}, need_inner_model=True),
    Schedule("karras", "Karras", {"use_karras_sigmas": True}, default_rho=7.0),
    Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}),
    # as whole timesteps, its dense low end puts two steps on one timestep from 29 steps on
    Schedule("polyexponential", "Polyexponential", None, default_rho=1.0, as_timesteps=False),
    Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, aliases=("SGMUniform",),
             need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal", None),
    Schedule("align_your_steps", "Align Your Steps", None, families=("sd15", "sdxl")),
    Schedule("simple", "Simple", {"timestep_spacing": "trailing"}, need_inner_model=True),
    Schedule("normal", "Normal", {"timestep_spacing": "linspace"}, need_inner_model=True),
    Schedule("ddim", "DDIM", {"timestep_spacing": "leading"}, need_inner_model=True),
    Schedule("beta", "Beta", {"use_beta_sigmas": True}, need_inner_model=True),
)
SCHEDULES: dict[str, Schedule] = {schedule.label: schedule for schedule in _SCHEDULES}
DEFAULT_SCHEDULE = "Automatic"
# every config option a schedule sets: the ones SchedulerClass.accepts speaks of
OPTION_KEYS = frozenset(key for schedule in _SCHEDULES for key in schedule.option or ())

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
    delivery(name, chosen, family)
    return name, chosen


def delivery(sampler: str, schedule: str, family: str | None) -> str | None:
    """How ``schedule`` reaches ``sampler``'s scheduler (both A1111 spellings): None as a config
    option, else ``sigmas`` or ``timesteps`` given to ``set_timesteps``; InvalidRequestError
    naming ``scheduler`` where neither can."""
    chosen, entry = SCHEDULES[schedule], SAMPLERS[sampler]
    if chosen.families is not None and family is not None and family not in chosen.families:
        raise InvalidRequestError("scheduler", f"{schedule} has no schedule for {family} models; it "
                                  f"has for {', '.join(chosen.families)}")
    if chosen.option is not None and entry.scheduler_class.accepts.issuperset(chosen.option):
        return None
    takes = [way for way in entry.takes() if way == "sigmas" or chosen.as_timesteps]
    if takes:
        return takes[0]
    explicit = "explicit sigmas or timesteps" if chosen.as_timesteps else "explicit sigmas"
    lacks = (f"takes neither {', '.join(chosen.option)} nor {explicit}" if chosen.option
             else f"does not take {explicit}")
    raise InvalidRequestError(
        "scheduler", f"sampler {sampler!r} does not take the {schedule} schedule (its diffusers "
        f"scheduler, {entry.scheduler_class.name}, {lacks})")
