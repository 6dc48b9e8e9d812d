"""The native API: ``POST /v1/generate`` answers a PNG with its parameters, First Block Cache step
counts and per-stage timings in headers; ``/v1/generate/stream`` is the same request as
server-sent events; ``GET /v1/models``, ``/v1/loras``, ``/v1/embeddings`` and ``/healthz``."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, JSONServerSentEvent

from pipeline.images import png_base64
from pipeline.sampler_names import DEFAULT_SAMPLER

from deployments.api.embeddings import native_embeddings
from deployments.api.errors import ApiError, error_body, error_response, internal_error_body
from deployments.api.generation import Generation, ServedModels
from deployments.api.image_input import decode_image, decode_mask
from deployments.api.init_images import FILLS, InitRequest, image_size, with_init
from deployments.api.protocol import (PING_S, DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, REQUEST_ERRORS,
                                      SERVER_ERRORS, CacheRequest, ClipSkip, FillIndex, GuidanceScale,
                                      ImageData, ImageSide, LoraRequest, MaskBlur, Name,
                                      ResizeMode, Seed, Steps, Strength, Text, lora_pairs)
from deployments.api.readiness import RETRY_AFTER_S as READY_RETRY_AFTER_S, Readiness
from deployments.api.serving import Serving
from deployments.settings import Limits
from deployments.messages import Decoded, StepProgress
from deployments.reporting import ReportingTask

logger = logging.getLogger("ray.serve")


class GenerateRequest(BaseModel):
    """POST /v1/generate. Unknown fields are refused so that a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text
    negative_prompt: Text | None = None
    width: ImageSide | None = None  # absent: the model's native size
    height: ImageSide | None = None
    steps: Steps = DEFAULT_STEPS
    guidance_scale: GuidanceScale = DEFAULT_GUIDANCE_SCALE
    seed: Seed | None = None
    sampler: Name = DEFAULT_SAMPLER
    scheduler: Name | None = None  # the schedule, as A1111 names it (Karras...); absent: Automatic
    model: Name | None = None
    cache: CacheRequest | None = None
    loras: list[LoraRequest] = Field(default_factory=list)
    clip_skip: ClipSkip = 1  # A1111's: 1 = the text encoder's last layer, 2 = the penultimate
    # image to image: absent width and height then take the init image's own size
    init_image: ImageData | None = None
    strength: Strength = 0.75
    mask: ImageData | None = None  # inpainting: white (after inversion) is redrawn
    mask_blur: MaskBlur = 4
    inpainting_mask_invert: bool = False
    inpainting_fill: FillIndex = 1
    resize_mode: ResizeMode = 0
    # streaming: each step event carries a small PNG of the image so far (latent-sized)
    previews: bool = False


class Health(BaseModel):
    status: str  # "ok"
    default_model: str


def to_generation(body: GenerateRequest, models: ServedModels) -> Generation:
    init = _init_request(body, models.limits)
    width, height = body.width, body.height
    if init is not None:
        own_width, own_height = image_size(init.image)
        width, height = width or own_width, height or own_height
    generation = models.resolve(
        {}, prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
        width=width, height=height, steps=body.steps, guidance_scale=body.guidance_scale,
        sampler=body.sampler, scheduler=body.scheduler, seed=body.seed, count=1, cache=body.cache,
        loras=lora_pairs(body.loras), clip_skip=body.clip_skip)
    return generation if init is None else with_init(generation, init)


def _init_request(body: GenerateRequest, limits: Limits) -> InitRequest | None:
    if body.init_image is None:
        if body.mask is not None:
            raise ApiError("mask", "inpainting needs an init_image")
        return None
    mask = None if body.mask is None else decode_mask(body.mask, "mask", limits)
    return InitRequest(decode_image(body.init_image, "init_image", limits), body.strength, mask,
                       body.resize_mode, body.mask_blur, body.inpainting_mask_invert,
                       FILLS[body.inpainting_fill])


def step_event(progress: StepProgress) -> dict[str, Any]:
    """A step event's data: the step, and the preview when there is one."""
    event: dict[str, Any] = {"step": progress.step, "steps": progress.steps}
    if progress.preview is not None:
        event["preview"] = png_base64(progress.preview)
    return event


def step_headers(images: list[Decoded]) -> dict[str, str]:
    """UNet steps run and skipped by First Block Cache, summed over the request's images."""
    return {"x-raydiance-steps-computed": str(sum(d.steps_computed for d in images)),
            "x-raydiance-steps-cached": str(sum(d.steps_cached for d in images))}


def _image_headers(generation: Generation, decoded: Decoded, total_ms: float) -> dict[str, str]:
    timings = {**decoded.timings, "total": total_ms}
    return {
        **step_headers([decoded]),
        "x-raydiance-seed": str(generation.seed), "x-raydiance-model": generation.model,
        "x-raydiance-width": str(generation.width), "x-raydiance-height": str(generation.height),
        "x-raydiance-steps": str(generation.steps), "x-raydiance-sampler": generation.sampler,
        "x-raydiance-scheduler": generation.scheduler,
        "x-raydiance-guidance-scale": f"{generation.guidance_scale:g}",
        "server-timing": ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items()),
        **{f"x-raydiance-{k}-ms": f"{v:.1f}" for k, v in timings.items()},
    }


class NativeApi:
    def __init__(self, serving: Serving, models: ServedModels,
                 readiness: Readiness | None = None) -> None:
        self.serving, self.models, self.readiness = serving, models, readiness

    async def generate(self, body: GenerateRequest) -> Response:
        start = time.perf_counter()
        generation = await asyncio.to_thread(to_generation, body, self.models)
        (decoded,) = await self.serving.generate(generation)
        headers = _image_headers(generation, decoded, (time.perf_counter() - start) * 1000)
        return Response(decoded.png, media_type="image/png", headers=headers)

    async def stream(self, body: GenerateRequest) -> EventSourceResponse:
        # a bad request is refused before streaming
        generation = await asyncio.to_thread(to_generation, body, self.models)
        return EventSourceResponse(self._events(generation, body.previews), ping=PING_S,
                                   headers={"x-raydiance-seed": str(generation.seed)})

    async def _events(self, generation: Generation,
                      previews: bool) -> AsyncIterator[JSONServerSentEvent]:
        """``step`` per denoising step (with ``preview``, a base64 PNG, if asked), then
        ``image``; or ``error`` once streaming has begun.
        A client gone cancels this generator, and leaving the ``ReportingTask`` cancels the
        stages' work."""
        async with ReportingTask(lambda report: self.serving.generate(
                generation, on_step=lambda _, progress: report(progress),
                previews=previews)) as task:
            async for progress in task.reports():
                yield JSONServerSentEvent(step_event(progress), event="step")
            try:
                images = task.result()
            except ApiError as error:
                yield JSONServerSentEvent(error_body(error.status or 422, error.field, error.message,
                                                     error.code), event="error")
                return
            except Exception:  # noqa: BLE001 - the stream has begun: report, don't raise
                logger.exception("generation failed mid-stream")
                yield JSONServerSentEvent(internal_error_body(), event="error")
                return
        for seed, decoded in zip(generation.seeds(), images):
            yield JSONServerSentEvent({"seed": seed, "png_base64": base64.b64encode(decoded.png).decode(),
                                       "steps_computed": decoded.steps_computed,
                                       "steps_cached": decoded.steps_cached, "timings": decoded.timings},
                                      event="image")

    async def list_models(self) -> dict[str, Any]:
        infos = await asyncio.to_thread(self.models.catalog.describe_all)
        data = [{"id": info.name, "object": "model", "created": 0, "owned_by": "raydiance",
                 "family": info.family, "native_size": info.native_size,
                 "default": info.name == self.models.default_model} for info in infos]
        served = {entry["id"]: entry for entry in data}
        data += [{**served[target], "id": alias, "default": False, "alias_of": target}
                 for alias, target in self.models.aliases.items()
                 if target in served and alias not in served]
        return {"object": "list", "data": data}

    async def list_loras(self) -> dict[str, Any]:
        names = await asyncio.to_thread(self.models.lora_names)
        return {"object": "list", "data": [{"id": name, "object": "lora"} for name in names]}

    async def list_embeddings(self) -> dict[str, Any]:
        return await native_embeddings(self.models)

    def health(self) -> Response:
        """200 once every stage is up; 503 ``starting`` (Retry-After) while models still load."""
        if self.readiness is not None and not self.readiness.ready:
            return error_response(503, None, "starting: the models are still loading",
                                  "starting", {"Retry-After": str(READY_RETRY_AFTER_S)})
        return JSONResponse({"status": "ok", "default_model": self.models.default_model})


def _api(request: Request) -> NativeApi:
    return request.app.state.native


Api = Annotated[NativeApi, Depends(_api)]
router = APIRouter(responses=SERVER_ERRORS)


@router.post("/v1/generate", response_class=Response,
             responses={200: {"content": {"image/png": {}}}, **REQUEST_ERRORS})
async def generate(body: GenerateRequest, api: Api) -> Response:
    return await api.generate(body)


@router.post("/v1/generate/stream", response_class=EventSourceResponse,
             responses={200: {"content": {"text/event-stream": {}}}, **REQUEST_ERRORS})
async def generate_stream(body: GenerateRequest, api: Api) -> EventSourceResponse:
    """``/v1/generate`` as server-sent events: ``step`` after every denoising step (``{"step",
    "steps"}``), then ``image`` (``{"seed", "png_base64", "steps_computed", "steps_cached",
    "timings"}``), or ``error`` (the JSON error body) if it fails once streaming has begun. A bad
    request is refused before streaming, as ``/v1/generate``."""
    return await api.stream(body)


@router.get("/v1/models")
async def models(api: Api) -> dict[str, Any]:
    return await api.list_models()


@router.get("/v1/loras")
async def loras(api: Api) -> dict[str, Any]:
    return await api.list_loras()


@router.get("/v1/embeddings")
async def embeddings(api: Api) -> dict[str, Any]:
    """The textual inversion embeddings of ``embeddings_dir``, used by name in prompts."""
    return await api.list_embeddings()


@router.get("/healthz", response_model=Health)
async def healthz(api: Api) -> Response:
    """200 when the service is ready: every stage's replicas up, the models loaded."""
    return api.health()
