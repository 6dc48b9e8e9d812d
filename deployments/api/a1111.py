"""The AUTOMATIC1111 API, as Open WebUI and SillyTavern call it: ``POST /sdapi/v1/txt2img``, the
read endpoints they list models, samplers and LoRAs with, the selected checkpoint
(``/sdapi/v1/options``) and step progress (``/sdapi/v1/progress``).

A1111 keeps one selected checkpoint per server; so does each Ingress replica here. LoRAs come as
A1111's ``<lora:name:weight>`` prompt tags, stripped before CLIP.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from pipeline.prompt_loras import parse_prompt_loras
from pipeline.samplers import DEFAULT_SAMPLER, SAMPLERS

from deployments.api.errors import ApiError, in_callers_terms
from deployments.api.generation import Generation, ServedModels
from deployments.api.protocol import (REQUEST_ERRORS, SERVER_ERRORS, CacheRequest, GuidanceScale,
                                      ImageCount, ImageSide, Name, Seed, Steps, Text)
from deployments.api.serving import Serving
from deployments.messages import Decoded

SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}
NAMES = {"guidance_scale": "cfg_scale", "sampler": "sampler_name", "count": "batch_size",
         "loras": "prompt", "model": "override_settings.sd_model_checkpoint"}


class OverrideSettings(BaseModel):
    """A1111's per-request settings: the checkpoint, and Raydiance's ``cache`` (A1111 clients can
    pass only ``override_settings`` through); other A1111 settings are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    sd_model_checkpoint: Name | None = None
    cache: CacheRequest | None = None


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. Defaults are the A1111 web UI's; A1111 fields Raydiance does not
    implement (hires fix, restore_faces, alwayson_scripts, ...) are accepted and ignored, as A1111
    does: dropped while parsing, so they are never echoed back in ``parameters``."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text = ""
    negative_prompt: Text | None = None
    steps: Steps = 20
    cfg_scale: GuidanceScale = 7.0
    width: ImageSide | None = None
    height: ImageSide | None = None
    seed: Seed = -1
    sampler_name: Name | None = None
    sampler_index: Name | None = None
    scheduler: Name | None = None
    batch_size: ImageCount = 1
    n_iter: ImageCount = 1
    override_settings: OverrideSettings | None = None
    cache: CacheRequest | None = None  # Raydiance's own field; or override_settings.cache


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]  # the request's known fields, as parsed
    info: str


class OptionsUpdate(BaseModel):
    """POST /sdapi/v1/options. Open WebUI posts back the whole options object with one key
    changed: other keys are accepted and ignored; only the checkpoint is checked and kept."""

    model_config = ConfigDict(extra="ignore")

    sd_model_checkpoint: Name | None = None


def _sampler(body: Txt2ImgRequest) -> str:
    """The sampler, with A1111's separate ``scheduler`` folded into its name (``DPM++ 2M`` and
    ``karras`` make ``DPM++ 2M Karras``)."""
    sampler = body.sampler_name or body.sampler_index or DEFAULT_SAMPLER
    scheduler = (body.scheduler or "automatic").strip().lower()
    if scheduler not in SCHEDULERS:
        raise ApiError("scheduler", f"{body.scheduler!r} is not served; choose one of "
                       f"{', '.join(SCHEDULERS.values())}")
    if scheduler == "karras" and not sampler.lower().endswith("karras"):
        if f"{sampler} Karras".lower() not in {s.lower() for s in SAMPLERS}:
            raise ApiError("scheduler", f"sampler {sampler!r} has no Karras variant here")
        sampler = f"{sampler} Karras"
    return sampler


def field_names(body: Txt2ImgRequest) -> dict[str, str]:
    """The request's own names for the neutral fields: where its model and cache came from."""
    names = dict(NAMES)
    overrides = body.override_settings or OverrideSettings()
    if overrides.sd_model_checkpoint is None:
        names["model"] = "sd_model_checkpoint"
    if overrides.cache is not None:
        names["cache"] = "override_settings.cache"
    return names


def to_generation(body: Txt2ImgRequest, models: ServedModels,
                  selected_model: str | None = None) -> Generation:
    """``selected_model``: the checkpoint chosen through ``/sdapi/v1/options`` (None: the default)."""
    overrides = body.override_settings or OverrideSettings()
    model = overrides.sd_model_checkpoint
    if model is None:
        model = selected_model
    cache = body.cache
    if overrides.cache is not None:
        if body.cache is not None:
            raise ApiError("cache", "give cache or override_settings.cache, not both")
        cache = overrides.cache
    with in_callers_terms({}):
        prompt, loras = parse_prompt_loras(body.prompt)
    return models.resolve(
        field_names(body), prompt=prompt, negative_prompt=body.negative_prompt or None, model=model,
        width=body.width, height=body.height, steps=body.steps, guidance_scale=body.cfg_scale,
        sampler=_sampler(body), seed=body.seed, count=body.batch_size * body.n_iter, cache=cache,
        loras=loras)


def _info(body: Txt2ImgRequest, generation: Generation, images: list[Decoded]) -> dict[str, Any]:
    """What A1111 answers in ``info`` (a JSON string), with Raydiance's cache counts added."""
    g, seeds = generation, generation.seeds()
    return {
        "prompt": g.prompt, "all_prompts": [g.prompt] * g.count,
        "negative_prompt": g.negative_prompt or "",
        "all_negative_prompts": [g.negative_prompt or ""] * g.count,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * g.count,
        "width": g.width, "height": g.height, "sampler_name": g.sampler,
        "cfg_scale": g.guidance_scale, "steps": g.steps, "batch_size": body.batch_size,
        "n_iter": body.n_iter, "sd_model_name": g.model, "sd_model_hash": None,
        "infotexts": [g.infotext(seed) for seed in seeds],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "raydiance",
        "steps_computed": [d.steps_computed for d in images],
        "steps_cached": [d.steps_cached for d in images],
        "cache": dataclasses.asdict(g.cache),
    }


@dataclasses.dataclass
class _Job:
    """A txt2img in flight on this replica: steps done per image, of ``steps``."""

    steps: int
    done: list[int]


class A1111Api:
    def __init__(self, serving: Serving, models: ServedModels) -> None:
        self.serving, self.models = serving, models
        # in flight, by a number of their own: two jobs with equal progress stay two entries
        self.jobs: dict[int, _Job] = {}
        self._job_ids = itertools.count()
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": models.default_model, "sd_checkpoint_hash": None,
            "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
        }

    async def txt2img(self, body: Txt2ImgRequest) -> Txt2ImgResponse:
        generation = await asyncio.to_thread(to_generation, body, self.models,
                                             self.options["sd_model_checkpoint"])
        job_id, job = next(self._job_ids), _Job(generation.steps, [0] * generation.count)
        self.jobs[job_id] = job
        try:
            with in_callers_terms(field_names(body)):  # a stage's refusal, in A1111's names
                images = await self.serving.generate(generation, on_step=lambda image, progress:
                                                     job.done.__setitem__(image, progress.step))
        finally:
            del self.jobs[job_id]
        return Txt2ImgResponse(images=[base64.b64encode(d.png).decode("ascii") for d in images],
                               parameters=body.model_dump(mode="json"),
                               info=json.dumps(_info(body, generation, images)))

    async def set_options(self, options: OptionsUpdate) -> None:
        """Selects the checkpoint (404 naming ``sd_model_checkpoint`` if it is not served)."""
        model = options.sd_model_checkpoint
        if model is not None:
            await asyncio.to_thread(self.models.describe, model, "sd_model_checkpoint")
            self.options["sd_model_checkpoint"] = model

    def progress(self) -> dict[str, Any]:
        """Step progress of the txt2img requests in flight on this replica."""
        jobs = list(self.jobs.values())
        total = sum(job.steps * len(job.done) for job in jobs)
        finished = sum(sum(job.done) for job in jobs)
        latest = jobs[-1] if jobs else _Job(0, [0])
        return {"progress": finished / total if total else 0.0, "eta_relative": 0.0,
                "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "job": "",
                          "job_count": len(jobs), "job_timestamp": "0", "job_no": 0,
                          "sampling_step": max(latest.done), "sampling_steps": latest.steps}}

    async def sd_models(self) -> list[dict[str, Any]]:
        infos = await asyncio.to_thread(self.models.catalog.describe_all)
        return [{"title": info.name, "model_name": info.name, "hash": None, "sha256": None,
                 "filename": info.path, "config": None} for info in infos]

    async def loras(self) -> list[dict[str, Any]]:
        """What A1111's Lora extension lists; clients build ``<lora:name:weight>`` tags from it."""
        files = await asyncio.to_thread(self.models.lora_files)
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}} for name, path in files]


def _api(request: Request) -> A1111Api:
    return request.app.state.a1111


Api = Annotated[A1111Api, Depends(_api)]
router = APIRouter(prefix="/sdapi/v1", responses=SERVER_ERRORS)


@router.post("/txt2img", response_model=Txt2ImgResponse, responses=REQUEST_ERRORS)
async def txt2img(body: Txt2ImgRequest, api: Api) -> Txt2ImgResponse:
    return await api.txt2img(body)


@router.get("/options")
async def get_options(api: Api) -> dict[str, Any]:
    return dict(api.options)


@router.post("/options", responses=REQUEST_ERRORS)
async def set_options(body: OptionsUpdate, api: Api) -> None:
    await api.set_options(body)


@router.get("/progress")
async def progress(api: Api) -> dict[str, Any]:
    return api.progress()


@router.get("/sd-models")
async def sd_models(api: Api) -> list[dict[str, Any]]:
    return await api.sd_models()


@router.get("/loras")
async def loras(api: Api) -> list[dict[str, Any]]:
    return await api.loras()


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": key, "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for key, label in SCHEDULERS.items()]


@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    return []


@router.get("/sd-vae")
async def sd_vae() -> list[dict[str, Any]]:
    return []
