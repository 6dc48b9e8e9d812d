"""The request fields the three dialects share, their bounds declared once as ``Annotated`` types,
and the error body every route answers with.

Pydantic checks these while parsing a body, so a value out of bounds is refused naming the
caller's own field before anything else runs. Bounds that come from the app's config
(``limits``) are checked later, in one place: ``ServedModels.resolve``. Every number that reaches
torch has a fixed bound here too, so that no config can let an unbounded value through.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from pipeline.prompt_loras import MAX_LORA_WEIGHT
from pipeline.seeds import MAX_SEED
from pipeline.unet.cache_config import (CacheMode, CacheRule, RunGrowth, RunLimit, ScheduleFraction,
                                        TaylorOrder, Threshold)

SIZE_MULTIPLE = 8  # the VAE halves the side three times
MAX_SIDE = 8192  # pixels; the config's max_width/max_height are lower
MAX_STEPS = 1000  # a scheduler's whole training schedule; the config's max_steps is lower
MAX_IMAGES = 100  # per count field; the config's max_images bounds their product
MAX_GUIDANCE_SCALE = 30.0
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 5.0
MAX_LORAS = 8  # per request, checked in ServedModels.resolve (A1111 tags them into the prompt)
MAX_CLIP_SKIP = 12  # A1111's slider; a model with fewer text-encoder layers refuses more
MAX_NAME_CHARS = 200
NO_NUL = "^[^\\u0000]*$"  # documented in the schema; the validator below enforces it


def _valid_text(text: object) -> object:
    """Refuses what JSON can carry but no tokenizer, PNG text chunk or log line takes. Runs
    before pydantic's own ``str`` checks (which leave a non-string to refuse by type), so that
    a lone surrogate is named as such, not as a length pydantic could not count."""
    if not isinstance(text, str):
        return text
    if "\x00" in text:
        raise PydanticCustomError("text_nul", "must not contain NUL (\\u0000), at character {at}",
                                  {"at": text.index("\x00")})
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError("text_surrogate", "must be valid Unicode: a lone surrogate "
                                  "(\\ud800-\\udfff) at character {at}", {"at": error.start}) from None
    return text


def _text(description: str, **bounds: int) -> Any:
    """A ``str`` type checked by ``_valid_text``, then for its ``bounds`` (min/max_length:
    given first, they stay pydantic's own string checks, whose messages count characters)."""
    return Annotated[str, Field(**bounds), BeforeValidator(_valid_text),
                     Field(description=description, json_schema_extra={"pattern": NO_NUL})]


_TEXT = ("Unicode text: any character but NUL (\\u0000) and lone surrogates (\\ud800-\\udfff, "
         "which JSON can spell as escapes but UTF-8 cannot encode); newlines and tabs are fine.")
Text = _text(f"{_TEXT} A prompt's length is bounded by the server's max_prompt_chars (413 beyond it).")
"""Text a request may carry: valid Unicode (encodable as UTF-8, so no lone surrogates) without NUL.
A prompt holding either fails the tokenizer; refused at the edge (4xx naming the field) it fails
that request alone, not the batch it would have joined."""
NonEmptyText = _text(f"{_TEXT} Not empty.", min_length=1)

_NAME = f"{_TEXT} At most {MAX_NAME_CHARS} characters."
Name = _text(f"A name or option value (model, sampler, size...): {_NAME}", max_length=MAX_NAME_CHARS)
"""A name the server looks up (unknown: 404 for models and LoRAs, 422 for samplers): ``Text`` of
at most ``MAX_NAME_CHARS`` characters."""
LoraName = _text(f"A LoRA's file stem in the server's loras folder: {_NAME}", min_length=1,
                 max_length=MAX_NAME_CHARS)

ImageSide = Annotated[int, Field(ge=SIZE_MULTIPLE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE,
                                 description="pixels, a multiple of 8; at most the server's limit")]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, description="at most the server's max_steps")]
GuidanceScale = Annotated[float, Field(
    ge=0.0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
    description=f"classifier-free guidance, 0..{MAX_GUIDANCE_SCALE:g} (A1111's own range). Useful "
                "values are about 3..12; far beyond that the guided prediction leaves the range "
                "the model was trained on, and at 1e9 fp16 overflows to NaN: a black image.")]
Seed = Annotated[int, Field(ge=-1, le=MAX_SEED, description=f"0..{MAX_SEED}; -1 (or absent): random")]
ImageCount = Annotated[int, Field(ge=1, le=MAX_IMAGES, description="at most the server's max_images")]
ClipSkip = Annotated[int, Field(ge=1, le=MAX_CLIP_SKIP, description=(
    f"A1111's clip skip (CLIP_stop_at_last_layers), 1..{MAX_CLIP_SKIP}: 1 = the text encoder's "
    "last layer (the default), 2 = the penultimate, as A1111 counts (diffusers' clip_skip + 1); "
    "SDXL counts from its usual penultimate layer, as diffusers does. At most the model's layers"))]
LoraWeight = Annotated[float, Field(
    ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False,
    description=f"-{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}, as in A1111's <lora:name:weight> tags")]

ImageData = Annotated[str, Field(
    min_length=1, description="an image file (PNG, JPEG, WebP...) as base64, or a data: URL; at "
                              "most the server's max_input_bytes and max_input_pixels")]
Strength = Annotated[float, Field(
    ge=0.0, le=1.0, allow_inf_nan=False,
    description="how much of the init image is redrawn: 0 returns it (through the VAE), 1 "
                "draws anew; the steps run are int(steps * strength)")]
MaskBlur = Annotated[int, Field(ge=0, le=64, description="pixels of Gaussian blur on the mask edge")]
ResizeMode = Annotated[int, Field(ge=0, le=3, description=(
    "fitting the init image to the size asked for, as A1111: 0 just resize, 1 crop and resize, "
    "2 resize and fill, 3 just resize"))]
FillIndex = Annotated[int, Field(ge=0, le=3, description=(
    "what the masked area starts from, as A1111: 0 fill (blurred surroundings), 1 original, "
    "2 latent noise, 3 latent nothing"))]


class CacheRequest(BaseModel):
    """First Block Cache settings for one request, with the bounds of ``FirstBlockCacheConfig``;
    what is left out keeps the model family's default. ``{"threshold": 0}`` turns the cache off
    (the image is then exactly the uncached one); an explicit null ``max_consecutive_hits``
    means no limit."""

    model_config = ConfigDict(extra="forbid")

    threshold: Threshold | None = None
    start: ScheduleFraction | None = None
    end: ScheduleFraction | None = None
    max_consecutive_hits: RunLimit | None = None
    run_growth: RunGrowth | None = None
    mode: CacheMode | None = None
    order: TaylorOrder | None = None
    rule: CacheRule | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields the caller set, for ``FirstBlockCacheConfig.with_overrides``."""
        return self.model_dump(exclude_unset=True)


class LoraRequest(BaseModel):
    """One LoRA for one request: a file name (stem) in the server's loras folder, and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: LoraName
    weight: LoraWeight = 1.0


def lora_pairs(loras: list[LoraRequest]) -> list[tuple[str, float]]:
    return [(lora.name, lora.weight) for lora in loras]


class ErrorDetail(BaseModel):
    message: str = Field(description="starts with the field's name when one is at fault")
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(description="the request field at fault, in the caller's terms")
    code: str
    request_id: str | None = Field(default=None, description=(
        "the answer's x-request-id: the key to the server log, where a 5xx's details are"))


class ErrorBody(BaseModel):
    """Every error answer's body, on every route (``deployments.api.errors`` writes it): OpenAI
    clients read ``error``, FastAPI and A1111 clients ``detail`` (the same message)."""

    error: ErrorDetail
    detail: str


def declared(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": text} for status, text in descriptions.items()}


PING_S = 15  # a comment line this often keeps proxies from closing a quiet event stream

SERVER_ERRORS = declared({
    429: "Too many requests; retry after Retry-After seconds",
    500: "A server bug: a generic message and a request id, the details in the server log",
    503: "Overloaded, timed out or a stage unavailable; retry after Retry-After seconds"})
"""The error answers any route may give, declared on every router (OpenAPI)."""
REQUEST_ERRORS = declared({
    400: "Malformed body; on the OpenAI route also a bad value",
    404: "Unknown model or LoRA",
    413: "Body or prompt too long",
    422: "A value out of bounds or of the wrong type (the field in error.param)"})
"""The refusals of a route that takes a body, declared on those routes (OpenAPI)."""
