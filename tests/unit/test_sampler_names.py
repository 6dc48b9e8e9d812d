"""The name-level sampler table: its static facts about diffusers' classes hold, it imports
neither torch nor diffusers, and it resolves names and refuses combinations as it always has.

A diffusers upgrade that changes what a scheduler class takes fails here, not in a request.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.configs import bundled_config
from pipeline.errors import InvalidRequestError
from pipeline.sampler_names import OPTION_KEYS, SAMPLERS, SCHEDULES, resolve_sampler
from pipeline.samplers import SCHEDULER_CLASSES, SIGMA_SCHEDULES, scheduler_setup

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_samplers_class_takes_what_the_table_says(sampler):
    facts = SAMPLERS[sampler].scheduler_class
    cls = SCHEDULER_CLASSES[facts.name]
    assert cls.__name__ == facts.name and issubclass(cls, SchedulerMixin)
    accepted = inspect.signature(cls.__init__).parameters
    assert facts.accepts == {key for key in OPTION_KEYS if key in accepted}
    takes = inspect.signature(cls.set_timesteps).parameters
    assert facts.takes == tuple(way for way in ("sigmas", "timesteps") if way in takes)
    built, _ = scheduler_setup(sampler, "Automatic", bundled_config("sd15", "scheduler"), 4, seed=1)
    assert type(built) is cls


def test_every_class_is_a_samplers_and_euler_takes_every_option():
    assert set(SCHEDULER_CLASSES) == {s.scheduler_class.name for s in SAMPLERS.values()}
    # diffusers' Euler sets the sigmas of an option a sampler's own class lacks
    assert SAMPLERS["Euler"].scheduler_class.accepts == OPTION_KEYS
    assert SAMPLERS["UniPC"].takes() == () != SAMPLERS["UniPC"].scheduler_class.takes


def test_explicit_sigma_schedules_are_computed_for_each_family_they_name():
    assert {s.label for s in SCHEDULES.values() if s.explicit_sigmas} == set(SIGMA_SCHEDULES)
    config = bundled_config("sd15", "scheduler")
    for family in SCHEDULES["Align Your Steps"].families:
        _, given = scheduler_setup("Euler", "Align Your Steps", config, 10, family)
        assert len(given["sigmas"]) == 11 and given["sigmas"][-1] == 0


def test_importing_the_names_imports_neither_torch_nor_diffusers():
    code = ("import sys, pipeline.sampler_names; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("sampler,schedule,family,expected", [
    ("DPM++ 2M", "karras", None, ("DPM++ 2M", "Karras")),  # a config option
    ("Euler a", "Karras", "sd15", ("Euler a", "Karras")),  # as sigmas: its class lacks the option
    ("Euler a", "Polyexponential", None, ("Euler a", "Polyexponential")),
    ("Euler", "Polyexponential", None, ("Euler", "Polyexponential")),
    ("DPM++ 2M", "Align Your Steps", "sd15", ("DPM++ 2M", "Align Your Steps")),  # as timesteps
    ("Heun", "KL Optimal", None, ("Heun", "KL Optimal")),
    ("Euler a", "Align Your Steps", None, ("Euler a", "Align Your Steps")),  # no family: not checked
    ("k_dpmpp_2m_sde_heun", "Beta", None, ("DPM++ 2M SDE Heun", "Beta")),
    ("DPM++ 2M Karras", None, None, ("DPM++ 2M", "Karras")),
    ("DPM++ 2M Karras", "Karras", None, ("DPM++ 2M", "Karras")),
    ("PLMS", "sgm_uniform", None, ("PLMS", "SGM Uniform")),
    ("UniPC", "Exponential", None, ("UniPC", "Exponential")),
    ("DPM++ SDE", "Automatic", "sdxl", ("DPM++ SDE", "Automatic")),
    ("DPM2 a", "Beta", "sdxl", ("DPM2 a", "Beta")),
    (None, "Karras", None, ("Euler", "Karras")),
    ("", "", None, ("Euler", "Automatic")),
])
def test_resolves_names_to_their_a1111_spellings(sampler, schedule, family, expected):
    assert resolve_sampler(sampler, schedule, family) == expected


def _lacks(sampler: str, schedule: str, cls: str, lacks: str) -> str:
    return (f"scheduler: sampler {sampler!r} does not take the {schedule} schedule "
            f"(its diffusers scheduler, {cls}, {lacks})")


_NO_KARRAS = "takes neither use_karras_sigmas nor explicit sigmas or timesteps"
_NO_EXPLICIT = "does not take explicit sigmas or timesteps"


@pytest.mark.parametrize("sampler,schedule,family,message", [
    ("DDIM", "Karras", None, _lacks("DDIM", "Karras", "DDIMScheduler", _NO_KARRAS)),
    ("DDIM Karras", None, None, _lacks("DDIM", "Karras", "DDIMScheduler", _NO_KARRAS)),
    ("PLMS", "Exponential", None, _lacks("PLMS", "Exponential", "PNDMScheduler",
                                         _NO_KARRAS.replace("karras", "exponential"))),
    # its class has sigmas=, for flow-matching models only
    ("UniPC", "KL Optimal", None, _lacks("UniPC", "KL Optimal", "UniPCMultistepScheduler", _NO_EXPLICIT)),
    ("DPM++ 2M", "Polyexponential", None,  # sigmas only: as timesteps, two steps would share one
     _lacks("DPM++ 2M", "Polyexponential", "DPMSolverMultistepScheduler", "does not take explicit sigmas")),
    ("LMS", "Align Your Steps", "sd15",
     _lacks("LMS", "Align Your Steps", "LMSDiscreteScheduler", _NO_EXPLICIT)),
    ("Euler", "Align Your Steps", "svd",
     "scheduler: Align Your Steps has no schedule for svd models; it has for sd15, sdxl"),
    ("DPM++ 2M Karras", "Exponential", None, "scheduler: sampler 'DPM++ 2M Karras' names the Karras "
                                             "schedule, the scheduler asks for Exponential: give one"),
    ("Euler", "Linear Quadratic", None, "scheduler: unknown schedule 'Linear Quadratic'; choose one of "
     "Automatic, Uniform, Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, Align Your "
     "Steps, Simple, Normal, DDIM, Beta"),
    ("Heun++", None, None, "sampler: unknown sampler 'Heun++'; choose one of Euler, Euler a, DPM++ 2M, "
     "DDIM, UniPC, DPM++ SDE, DPM++ 2M SDE, DPM++ 2M SDE Heun, DPM++ 3M SDE, Heun, LMS, DPM2, DPM2 a, PLMS"),
])
def test_refusals_name_the_field_and_the_class(sampler, schedule, family, message):
    with pytest.raises(InvalidRequestError) as raised:
        resolve_sampler(sampler, schedule, family)
    assert str(raised.value) == message and raised.value.field == message.partition(":")[0]


_EXPLICIT = {"Polyexponential", "KL Optimal", "Align Your Steps"}
REFUSED = {  # every sampler's refused schedules, any family
    "Euler": set(), "Euler a": set(), "DPM++ 2M": {"Polyexponential"},
    "DDIM": {"Karras", "Exponential", "Beta", *_EXPLICIT}, "UniPC": _EXPLICIT, "DPM++ SDE": _EXPLICIT,
    "DPM++ 2M SDE": {"Polyexponential"}, "DPM++ 2M SDE Heun": {"Polyexponential"},
    "DPM++ 3M SDE": {"Polyexponential"}, "Heun": {"Polyexponential"}, "LMS": _EXPLICIT,
    "DPM2": _EXPLICIT, "DPM2 a": _EXPLICIT, "PLMS": {"Karras", "Exponential", "Beta", *_EXPLICIT},
}


def test_every_sampler_refuses_the_schedules_it_always_has():
    def refused(sampler: str) -> set[str]:
        out = set()
        for schedule in SCHEDULES:
            try:
                resolve_sampler(sampler, schedule)
            except InvalidRequestError:
                out.add(schedule)
        return out

    assert {sampler: refused(sampler) for sampler in SAMPLERS} == REFUSED
