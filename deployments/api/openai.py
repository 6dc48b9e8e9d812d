"""The OpenAI Images API: ``POST /v1/images/generations``, ``/v1/images/edits`` and
``/v1/images/variations``, as the official client and Open WebUI call them. ``n`` images, as
base64 PNGs; a bad value is a 400 naming the field, which the client raises as
``BadRequestError``.

Edits and variations come as multipart forms (files ``image`` or ``image[]`` and ``mask``) and
are image to image on the same pipeline: an edit with a mask (or an image with transparent
pixels) redraws the transparent area (inpainting, strength 1); an edit without one redraws the
whole image at ``strength`` (default 0.75); a variation is an edit with an empty prompt at
strength 0.6. Form fields are validated by the same model as the JSON body."""
from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from deployments.api.errors import ApiError
from deployments.api.image_input import as_rgb, decode_image, transparency_mask
from deployments.api.init_images import InitRequest, image_size, with_init
from deployments.api.jobs import JobsClient
from deployments.api.generation import Generation, ServedModels
from deployments.api.native import step_headers
from deployments.api.protocol import (DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, REQUEST_ERRORS,
                                      SERVER_ERRORS, CacheRequest, ImageCount, ImageSide,
                                      LoraRequest, Name, NonEmptyText, Seed, Steps, Strength,
                                      Text, lora_pairs)
from deployments.api.serving import Serving
from deployments.settings import Limits

NAMES = {"width": "size", "height": "size", "count": "n"}  # neutral field -> this API's
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_SIDE = TypeAdapter(ImageSide)


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations; OpenAI-only knobs (quality, style, user...) are accepted and
    ignored, as a drop-in backend must (never read, never echoed). ``negative_prompt``,
    ``steps``, ``seed``, ``cache`` and ``loras`` are Raydiance's (the client's ``extra_body``)."""

    model_config = ConfigDict(extra="ignore")

    prompt: NonEmptyText
    model: Name | None = None
    n: ImageCount = 1
    size: Name | None = Field(None, description="WIDTHxHEIGHT, each side a multiple of 8 within "
                              "the server's limits, or 'auto' (absent: the model's native size)")
    response_format: Literal["b64_json", "url"] | None = None  # url: kept for jobs.ttl_s
    output_format: Name | None = None  # only png
    stream: bool | None = None  # no partial images
    negative_prompt: Text | None = None  # not OpenAI's, but Open WebUI and others send it
    steps: Steps | None = None
    seed: Seed | None = None
    cache: CacheRequest | None = None
    loras: list[LoraRequest] = Field(default_factory=list)


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None  # response_format "url": the image kept for jobs.ttl_s
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: Literal["png"] = "png"
    size: str | None = None


def _size(size: str | None) -> tuple[int | None, int | None]:
    """``size`` as (width, height), each a valid image side; (None, None) for the model's own."""
    if size in (None, "", "auto"):
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise ApiError("size", f"{size!r} is not WIDTHxHEIGHT (e.g. '512x512') or 'auto'")
    try:
        return _SIDE.validate_python(int(match[1])), _SIDE.validate_python(int(match[2]))
    except ValidationError as error:
        raise ApiError("size", f"{size!r}: {error.errors()[0]['msg']}") from None


def _refuse_unserved(body: OpenAIImageRequest) -> None:
    """OpenAI options this server does not offer: a 400 that says why, not a silent substitute."""
    if body.stream:
        raise ApiError("stream", "streamed partial images are not served; leave stream off",
                       status=400, code="unsupported_value")
    if body.output_format not in (None, "png"):
        raise ApiError("output_format", f"{body.output_format!r} is not served; only 'png'",
                       status=400, code="unsupported_value")


class OpenAIEditRequest(OpenAIImageRequest):
    """The form fields of ``/v1/images/edits`` and ``/v1/images/variations`` (files apart)."""

    prompt: Text = ""  # variations have none
    strength: Strength | None = None  # Raydiance's: how much of the image is redrawn


def to_generation(body: OpenAIImageRequest, models: ServedModels,
                  init: InitRequest | None = None) -> Generation:
    _refuse_unserved(body)
    width, height = _size(body.size)
    if init is not None and width is None:
        width, height = image_size(init.image)
    generation = _resolved(body, models, width, height)
    return generation if init is None else with_init(generation, init)


def _resolved(body: OpenAIImageRequest, models: ServedModels, width: int | None,
              height: int | None) -> Generation:
    return models.resolve(
        NAMES, prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
        width=width, height=height, steps=body.steps or DEFAULT_STEPS,
        guidance_scale=DEFAULT_GUIDANCE_SCALE, sampler=None,
        seed=body.seed, count=body.n, cache=body.cache, loras=lora_pairs(body.loras))


def edit_init(form: FormData, body: OpenAIEditRequest, limits: Limits,
              default_strength: float) -> InitRequest:
    """The init image and mask of an edit form: the mask's transparent pixels (or, with no
    mask, the image's own) are redrawn."""
    files = [*form.getlist("image"), *form.getlist("image[]")]
    if not files or isinstance(files[0], str):
        raise ApiError("image", "an image file is required (multipart field 'image')")
    image = decode_image(files[0].file.read(), "image", limits, keep_alpha=True)
    mask_file = form.get("mask")
    if isinstance(mask_file, str):
        raise ApiError("mask", "the mask must be a file (a PNG whose transparent pixels are "
                       "redrawn)")
    mask = (transparency_mask(image) if mask_file is None
            else transparency_mask(decode_image(mask_file.file.read(), "mask", limits,
                                                keep_alpha=True)))
    strength = body.strength if body.strength is not None else (
        1.0 if mask is not None else default_strength)
    return InitRequest(as_rgb(image), strength, mask, mask_blur=0)


class OpenAIApi:
    def __init__(self, serving: Serving, models: ServedModels, jobs: JobsClient | None) -> None:
        self.serving, self.models, self.jobs = serving, models, jobs

    async def edit(self, form: FormData, request: Request, response: Response, *,
                   variation: bool) -> OpenAIImagesResponse:
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        try:
            body = OpenAIEditRequest.model_validate(fields | ({"prompt": ""} if variation else {}))
        except ValidationError as error:
            first = error.errors()[0]
            raise ApiError(".".join(str(p) for p in first["loc"]) or "body", first["msg"],
                           status=400) from None
        if not variation and not body.prompt:
            raise ApiError("prompt", "an edit needs a prompt", status=400)

        def prepare() -> Generation:
            init = edit_init(form, body, self.models.limits, 0.6 if variation else 0.75)
            return to_generation(body, self.models, init)

        return await self._answer(await asyncio.to_thread(prepare), body, request, response)

    async def generate(self, body: OpenAIImageRequest, request: Request,
                       response: Response) -> OpenAIImagesResponse:
        generation = await asyncio.to_thread(to_generation, body, self.models)
        return await self._answer(generation, body, request, response)

    async def _answer(self, generation: Generation, body: OpenAIImageRequest, request: Request,
                      response: Response) -> OpenAIImagesResponse:
        images = await self.serving.generate(generation)
        response.headers.update(step_headers(images))
        if body.response_format == "url":
            urls = await self.jobs.keep(request, images, generation.seeds())
            data = [OpenAIImage(url=url) for url in urls]
        else:
            data = [OpenAIImage(b64_json=base64.b64encode(d.png).decode("ascii")) for d in images]
        return OpenAIImagesResponse(created=int(time.time()),
                                    size=f"{generation.width}x{generation.height}", data=data)


def _api(request: Request) -> OpenAIApi:
    return request.app.state.openai


router = APIRouter(responses=SERVER_ERRORS)


@router.post("/v1/images/generations", response_model=OpenAIImagesResponse, responses=REQUEST_ERRORS)
async def generations(body: OpenAIImageRequest, request: Request, response: Response,
                      api: Annotated[OpenAIApi, Depends(_api)]) -> OpenAIImagesResponse:
    return await api.generate(body, request, response)


MULTIPART = {"requestBody": {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"},
                   "mask": {"type": "string", "format": "binary"},
                   "prompt": {"type": "string"}, "n": {"type": "integer"},
                   "size": {"type": "string"}, "response_format": {"type": "string"},
                   "model": {"type": "string"}, "strength": {"type": "number"}}}}}}}
"""The form as OpenAPI describes it (FastAPI cannot, for a form read by hand)."""


@router.post("/v1/images/edits", response_model=OpenAIImagesResponse, responses=REQUEST_ERRORS,
             openapi_extra=MULTIPART)
async def edits(request: Request, response: Response,
                api: Annotated[OpenAIApi, Depends(_api)]) -> OpenAIImagesResponse:
    async with request.form(max_files=4, max_fields=64) as form:
        return await api.edit(form, request, response, variation=False)


@router.post("/v1/images/variations", response_model=OpenAIImagesResponse,
             responses=REQUEST_ERRORS, openapi_extra=MULTIPART)
async def variations(request: Request, response: Response,
                     api: Annotated[OpenAIApi, Depends(_api)]) -> OpenAIImagesResponse:
    async with request.form(max_files=4, max_fields=64) as form:
        return await api.edit(form, request, response, variation=True)
