"""The OpenAI Images API: ``POST /v1/images/generations``, as the official client and Open WebUI
call it. ``n`` images of one prompt, as base64 PNGs; a bad value is a 400 naming the field, which
the client raises as ``BadRequestError``."""
from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from deployments.api.errors import ApiError
from deployments.api.generation import Generation, ServedModels
from deployments.api.native import step_headers
from deployments.api.protocol import (DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, REQUEST_ERRORS,
                                      SERVER_ERRORS, CacheRequest, ImageCount, ImageSide,
                                      LoraRequest, Name, NonEmptyText, Seed, Steps, Text, lora_pairs)
from deployments.api.serving import Serving

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
    response_format: Name | None = None  # only b64_json: this server keeps no files to link to
    output_format: Name | None = None  # only png
    stream: bool | None = None  # no partial images
    negative_prompt: Text | None = None  # not OpenAI's, but Open WebUI and others send it
    steps: Steps | None = None
    seed: Seed | None = None
    cache: CacheRequest | None = None
    loras: list[LoraRequest] = Field(default_factory=list)


class OpenAIImage(BaseModel):
    b64_json: str
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
    if body.response_format not in (None, "b64_json"):
        raise ApiError("response_format", f"{body.response_format!r} is not served: this server "
                       "keeps no image files to link to; ask for 'b64_json'", status=400,
                       code="unsupported_value")
    if body.stream:
        raise ApiError("stream", "streamed partial images are not served; leave stream off",
                       status=400, code="unsupported_value")
    if body.output_format not in (None, "png"):
        raise ApiError("output_format", f"{body.output_format!r} is not served; only 'png'",
                       status=400, code="unsupported_value")


def to_generation(body: OpenAIImageRequest, models: ServedModels) -> Generation:
    _refuse_unserved(body)
    width, height = _size(body.size)
    return models.resolve(
        NAMES, prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
        width=width, height=height, steps=body.steps or DEFAULT_STEPS,
        guidance_scale=DEFAULT_GUIDANCE_SCALE, sampler=None,
        seed=body.seed, count=body.n, cache=body.cache, loras=lora_pairs(body.loras))


class OpenAIApi:
    def __init__(self, serving: Serving, models: ServedModels) -> None:
        self.serving, self.models = serving, models

    async def generate(self, body: OpenAIImageRequest, response: Response) -> OpenAIImagesResponse:
        generation = await asyncio.to_thread(to_generation, body, self.models)
        images = await self.serving.generate(generation)
        response.headers.update(step_headers(images))
        return OpenAIImagesResponse(
            created=int(time.time()), size=f"{generation.width}x{generation.height}",
            data=[OpenAIImage(b64_json=base64.b64encode(d.png).decode("ascii")) for d in images])


def _api(request: Request) -> OpenAIApi:
    return request.app.state.openai


router = APIRouter(responses=SERVER_ERRORS)


@router.post("/v1/images/generations", response_model=OpenAIImagesResponse, responses=REQUEST_ERRORS)
async def generations(body: OpenAIImageRequest, response: Response,
                      api: Annotated[OpenAIApi, Depends(_api)]) -> OpenAIImagesResponse:
    return await api.generate(body, response)
