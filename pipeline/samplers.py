"""Samplers by their AUTOMATIC1111 names, built on diffusers' scheduler classes.

Each request gets its own scheduler instance: diffusers schedulers keep state (step index,
multistep history), so one instance must never serve two requests.
"""
from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.errors import InvalidRequestError

SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DDIM": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "UniPC": (UniPCMultistepScheduler, {}),
}
DEFAULT_SAMPLER = "Euler"
_BY_LOWER_NAME = {name.lower(): name for name in SAMPLERS}


def canonical_sampler_name(name: str) -> str:
    """The A1111 spelling of ``name`` (matched case-insensitively), or InvalidRequestError."""
    try:
        return _BY_LOWER_NAME[name.strip().lower()]
    except KeyError:
        raise InvalidRequestError(
            "sampler", f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def make_scheduler(name: str, model_scheduler_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler of sampler ``name`` on the model's own noise schedule."""
    scheduler_class, overrides = SAMPLERS[canonical_sampler_name(name)]
    return scheduler_class.from_config(model_scheduler_config, **overrides)
