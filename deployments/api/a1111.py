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

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from pipeline.images import png_base64
from pipeline.prompt_loras import parse_prompt_loras
from pipeline.sampler_names import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES, resolve_sampler
from pipeline.upscaler_names import canonical_upscaler

from deployments.api.errors import ApiError, in_callers_terms
from deployments.api.generation import Generation, HiresFix, ServedModels
from deployments.api.image_input import decode_image, decode_mask
from deployments.api.init_images import FILLS, InitRequest, image_size, with_init
from deployments.api.protocol import (MAX_IMAGES, MAX_SIDE, MAX_STEPS, REQUEST_ERRORS, SERVER_ERRORS,
                                      declared,
                                      CacheRequest, ClipSkip, FillIndex, GuidanceScale, ImageCount,
                                      ImageData, ImageSide, MaskBlur, Name, ResizeMode, Seed,
                                      Steps, Strength, Text)
from deployments.api.serving import Serving
from deployments.messages import Decoded, StepProgress
from deployments.settings import Limits

NAMES = {"guidance_scale": "cfg_scale", "sampler": "sampler_name", "count": "batch_size",
         "loras": "prompt", "model": "override_settings.sd_model_checkpoint"}


class OverrideSettings(BaseModel):
    """A1111's per-request settings: the checkpoint, clip skip, and Raydiance's ``cache`` (A1111
    clients can pass only ``override_settings`` through); other A1111 settings are accepted and
    ignored."""

    model_config = ConfigDict(extra="ignore")

    sd_model_checkpoint: Name | None = None
    CLIP_stop_at_last_layers: ClipSkip | None = None
    cache: CacheRequest | None = None


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. Defaults are the A1111 web UI's; A1111 fields Raydiance does not
    implement (restore_faces, alwayson_scripts, tiling, ...) are accepted and ignored, as A1111
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
    # the hires fix: a second pass at hr_scale (or hr_resize_x/y) redrawing denoising_strength
    enable_hr: bool = False
    hr_scale: Annotated[float, Field(ge=1.0, le=8.0, allow_inf_nan=False)] = 2.0
    hr_resize_x: Annotated[int, Field(ge=0, le=MAX_SIDE)] = 0
    hr_resize_y: Annotated[int, Field(ge=0, le=MAX_SIDE)] = 0
    hr_upscaler: Name | None = None  # absent: Latent
    hr_second_pass_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 0  # 0: steps
    hr_sampler_name: Name | None = None  # absent: the first pass's
    denoising_strength: Strength | None = None  # absent: 0.7


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]  # the request's known fields, as parsed
    info: str


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields and A1111's init-image ones. Absent width and
    height take the init image's size. With several ``init_images`` the first is used.
    ``inpaint_full_res`` is accepted and not applied: the whole image is inpainted."""

    init_images: list[ImageData] = Field(min_length=1, max_length=MAX_IMAGES)
    denoising_strength: Strength = 0.75
    resize_mode: ResizeMode = 0
    mask: ImageData | None = None
    mask_blur: MaskBlur | None = None  # sets both of A1111's mask_blur_x and mask_blur_y
    mask_blur_x: MaskBlur = 4
    mask_blur_y: MaskBlur = 4
    inpainting_fill: FillIndex = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: Annotated[int, Field(ge=0, le=MAX_SIDE)] = 0
    inpainting_mask_invert: Annotated[int, Field(ge=0, le=1)] = 0
    include_init_images: bool = False

    def init_request(self, limits: Limits) -> InitRequest:
        mask = None if self.mask is None else decode_mask(self.mask, "mask", limits)
        blur = self.mask_blur if self.mask_blur is not None else max(self.mask_blur_x,
                                                                     self.mask_blur_y)
        return InitRequest(decode_image(self.init_images[0], "init_images.0", limits),
                           self.denoising_strength, mask, self.resize_mode, blur,
                           bool(self.inpainting_mask_invert), FILLS[self.inpainting_fill])

    def parameters(self) -> dict[str, Any]:
        """As A1111 echoes it: the images themselves left out unless asked for."""
        return self.model_dump(mode="json") | (
            {} if self.include_init_images else {"init_images": None, "mask": None})


class OptionsUpdate(BaseModel):
    """POST /sdapi/v1/options. Open WebUI posts back the whole options object with one key
    changed: other keys are accepted and ignored; only the checkpoint and clip skip are checked
    and kept."""

    model_config = ConfigDict(extra="ignore")

    sd_model_checkpoint: Name | None = None
    CLIP_stop_at_last_layers: ClipSkip | None = None


def _sampler(body: Txt2ImgRequest) -> str:
    """The sampler's name; A1111's ``scheduler`` (``karras`` or ``Karras``) goes apart, and an
    older combined name (``DPM++ 2M Karras``) is split when resolved."""
    return body.sampler_name or body.sampler_index or DEFAULT_SAMPLER


def field_names(body: Txt2ImgRequest) -> dict[str, str]:
    """The request's own names for the neutral fields: where its model and cache came from."""
    names = dict(NAMES)
    overrides = body.override_settings or OverrideSettings()
    if overrides.sd_model_checkpoint is None:
        names["model"] = "sd_model_checkpoint"
    if overrides.cache is not None:
        names["cache"] = "override_settings.cache"
    names["clip_skip"] = ("CLIP_stop_at_last_layers" if overrides.CLIP_stop_at_last_layers is None
                          else "override_settings.CLIP_stop_at_last_layers")
    return names


def to_generation(body: Txt2ImgRequest, models: ServedModels,
                  selected_model: str | None = None, selected_clip_skip: int = 1) -> Generation:
    """``selected_model``: the checkpoint chosen through ``/sdapi/v1/options`` (None: the default);
    ``selected_clip_skip`` its ``CLIP_stop_at_last_layers``."""
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
    generation = models.resolve(
        field_names(body), prompt=prompt, negative_prompt=body.negative_prompt or None, model=model,
        width=body.width, height=body.height, steps=body.steps, guidance_scale=body.cfg_scale,
        sampler=_sampler(body), scheduler=body.scheduler, seed=body.seed,
        count=body.batch_size * body.n_iter, cache=cache, loras=loras,
        clip_skip=overrides.CLIP_stop_at_last_layers or selected_clip_skip)
    return generation if not body.enable_hr else dataclasses.replace(
        generation, hires=_hires(body, generation, models.limits))


def _hires_sampler(name: str | None, first: Generation) -> str:
    """The second pass's sampler (absent: the first pass's); it runs on the first pass's
    schedule, so it must take it, and an older combined name must not name another."""
    if not name:
        return first.sampler
    sampler, schedule = resolve_sampler(name, first.scheduler)
    if schedule != first.scheduler:
        raise ApiError("hr_sampler_name", f"{name!r} names the {schedule} schedule; the second pass "
                       f"runs on the first pass's, {first.scheduler}")
    return sampler


def _hires(body: Txt2ImgRequest, first: Generation, limits: Limits) -> HiresFix:
    """The second pass ``body`` asks for: its size on the 8-pixel grid within the limits."""
    if body.hr_resize_x or body.hr_resize_y:
        field = "hr_resize_x"
        width = body.hr_resize_x or round(body.hr_resize_y * first.width / first.height)
        height = body.hr_resize_y or round(body.hr_resize_x * first.height / first.width)
    else:
        field = "hr_scale"
        width, height = round(first.width * body.hr_scale), round(first.height * body.hr_scale)
    width, height = max(8, width // 8 * 8), max(8, height // 8 * 8)
    if width > limits.max_width or height > limits.max_height:
        raise ApiError(field, f"the second pass would be {width}x{height}, above this server's "
                       f"limit of {limits.max_width}x{limits.max_height}")
    steps = body.hr_second_pass_steps or first.steps
    if steps > limits.max_steps:
        raise ApiError("hr_second_pass_steps", f"{steps} is above this server's limit of "
                       f"{limits.max_steps}")
    with in_callers_terms({"sampler": "hr_sampler_name", "scheduler": "hr_sampler_name"}):
        sampler = _hires_sampler(body.hr_sampler_name, first)
        upscaler = canonical_upscaler(body.hr_upscaler or "Latent")
    strength = 0.7 if body.denoising_strength is None else body.denoising_strength
    return HiresFix(width, height, upscaler, steps, strength, sampler)


def to_img2img_generation(body: Img2ImgRequest, models: ServedModels,
                          selected_model: str | None = None,
                          selected_clip_skip: int = 1) -> Generation:
    """``to_generation`` starting from the request's first init image."""
    init = body.init_request(models.limits)
    width, height = image_size(init.image)
    sized = body.model_copy(update={"width": body.width or width, "height": body.height or height,
                                    "enable_hr": False})
    return with_init(to_generation(sized, models, selected_model, selected_clip_skip), init)


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
        "clip_skip": g.clip_skip,
        "infotexts": [g.infotext(seed) for seed in seeds],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "raydiance",
        "steps_computed": [d.steps_computed for d in images],
        "steps_cached": [d.steps_cached for d in images],
        "cache": dataclasses.asdict(g.cache),
        "extra_generation_params": {"Schedule type": g.scheduler},
        "denoising_strength": g.strength if g.source is not None else None,
    }


@dataclasses.dataclass
class _Job:
    """A txt2img in flight on this replica: steps done per image, of ``steps``."""

    steps: int
    done: list[int]
    task: asyncio.Task | None = None  # the stage work, cancelled by /interrupt and /skip
    stopped: str | None = None  # "interrupted" or "skipped"
    preview: np.ndarray | None = None  # the latest step's look, for ``current_image``

    def stop(self, how: str) -> None:
        self.stopped = how
        if self.task is not None:
            self.task.cancel()

    def report(self, image: int, progress: StepProgress) -> None:
        """A step of ``image`` done; the total is the Denoiser's: UNet evaluations, 2 per step
        but the last for second-order samplers (Heun, DPM2), fewer with an init image."""
        self.steps, self.done[image] = progress.steps, progress.step
        if progress.preview is not None:
            self.preview = progress.preview


class A1111Api:
    def __init__(self, serving: Serving, models: ServedModels) -> None:
        self.serving, self.models = serving, models
        # in flight, by a number of their own: two jobs with equal progress stay two entries
        self.jobs: dict[int, _Job] = {}
        self._job_ids = itertools.count()
        self.stopped: str | None = None  # the last /interrupt or /skip, until a job begins
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": models.default_model, "sd_checkpoint_hash": None,
            "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
        }

    async def txt2img(self, body: Txt2ImgRequest) -> Txt2ImgResponse:
        generation = await asyncio.to_thread(to_generation, body, self.models,
                                             self.options["sd_model_checkpoint"],
                                             self.options["CLIP_stop_at_last_layers"])
        images = await self._generate(body, generation)
        return Txt2ImgResponse(images=[base64.b64encode(d.png).decode("ascii") for d in images],
                               parameters=body.model_dump(mode="json"),
                               info=json.dumps(_info(body, generation, images)))

    async def img2img(self, body: Img2ImgRequest) -> Txt2ImgResponse:
        generation = await asyncio.to_thread(to_img2img_generation, body, self.models,
                                             self.options["sd_model_checkpoint"],
                                             self.options["CLIP_stop_at_last_layers"])
        images = await self._generate(body, generation)
        encoded = [base64.b64encode(d.png).decode("ascii") for d in images]
        if body.include_init_images:
            encoded += [image.split(",", 1)[-1] for image in body.init_images]
        return Txt2ImgResponse(images=encoded, parameters=body.parameters(),
                               info=json.dumps(_info(body, generation, images)))

    async def _generate(self, body: Txt2ImgRequest, generation: Generation) -> list[Decoded]:
        """The images, this request's progress kept for ``/progress`` meanwhile."""
        job_id, job = next(self._job_ids), _Job(generation.steps, [0] * generation.count)
        self.jobs[job_id] = job
        self.stopped = None  # A1111 clears its flags when a job begins
        job.task = asyncio.ensure_future(self.serving.generate(generation, on_step=job.report,
                                                               previews=True))
        try:
            with in_callers_terms(field_names(body)):  # a stage's refusal, in A1111's names
                return await job.task
        except asyncio.CancelledError:
            if job.stopped is None:
                raise  # the client left
            return []  # stopped by /interrupt or /skip: no image was finished
        finally:
            job.task.cancel()  # a no-op once done; stops the stages if the client left
            del self.jobs[job_id]

    def stop(self, how: str) -> None:
        """``/interrupt`` and ``/skip``: every txt2img and img2img in flight on this replica
        stops; the engine drops its requests at their next step, and each answers 200 with the
        images it finished (none: a request's images run together here, so A1111's skip of
        one image of a batch stops the batch too)."""
        self.stopped = how
        for job in list(self.jobs.values()):
            job.stop(how)

    async def set_options(self, options: OptionsUpdate) -> None:
        """Selects the checkpoint (404 naming ``sd_model_checkpoint`` if it is not served) and
        clip skip (``CLIP_stop_at_last_layers``, 1..12; a model with fewer layers refuses more
        when it is used)."""
        model = options.sd_model_checkpoint
        if model is not None:
            await asyncio.to_thread(self.models.describe, model, "sd_model_checkpoint")
            self.options["sd_model_checkpoint"] = model
        if options.CLIP_stop_at_last_layers is not None:
            self.options["CLIP_stop_at_last_layers"] = options.CLIP_stop_at_last_layers

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        """Step progress of the txt2img and img2img requests in flight on this replica, with
        the latest one's look so far (a latent preview, latent-sized) as ``current_image``."""
        jobs = list(self.jobs.values())
        total = sum(job.steps * len(job.done) for job in jobs)
        finished = sum(sum(job.done) for job in jobs)
        latest = jobs[-1] if jobs else _Job(0, [0])
        return {"progress": finished / total if total else 0.0, "eta_relative": 0.0,
                "current_image": None if skip_current_image or latest.preview is None
                else png_base64(latest.preview),
                "textinfo": None,
                "state": {"skipped": self.stopped == "skipped",
                          "interrupted": self.stopped == "interrupted", "job": "",
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


@router.post("/img2img", response_model=Txt2ImgResponse, responses=REQUEST_ERRORS)
async def img2img(body: Img2ImgRequest, api: Api) -> Txt2ImgResponse:
    return await api.img2img(body)


@router.get("/options")
async def get_options(api: Api) -> dict[str, Any]:
    return dict(api.options)


@router.post("/options", responses=REQUEST_ERRORS)
async def set_options(body: OptionsUpdate, api: Api) -> None:
    await api.set_options(body)


@router.post("/interrupt")
async def interrupt(api: Api) -> None:
    """Stops the txt2img and img2img requests in flight on this Ingress replica."""
    api.stop("interrupted")


@router.post("/skip")
async def skip(api: Api) -> None:
    """As ``/interrupt`` (a request's images are made together, not one after another)."""
    api.stop("skipped")


@router.get("/progress", responses=declared({422: "skip_current_image is not a boolean"}))
async def progress(api: Api, skip_current_image: bool = False) -> dict[str, Any]:
    return api.progress(skip_current_image)


@router.get("/sd-models")
async def sd_models(api: Api) -> list[dict[str, Any]]:
    return await api.sd_models()


@router.get("/loras")
async def loras(api: Api) -> list[dict[str, Any]]:
    return await api.loras()


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": list(sampler.aliases), "options": dict(sampler.options)}
            for name, sampler in SAMPLERS.items()]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    """Every schedule served, with at least one sampler (pipeline.samplers)."""
    return [{"name": s.key, "label": s.label, "aliases": list(s.aliases) or None,
             "default_rho": s.default_rho, "need_inner_model": s.need_inner_model}
            for s in SCHEDULES.values()]


@router.get("/sd-vae")
async def sd_vae() -> list[dict[str, Any]]:
    return []
