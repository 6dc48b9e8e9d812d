"""Request and response bodies of the three HTTP APIs, and their mapping onto one generation.

Types and fixed bounds are checked by pydantic (FastAPI answers with the field's name); bounds
that come from the config (``limits``) and names that must exist (model, sampler) are checked
by ``resolve``, which also speaks the caller's own field names in its errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.unet.cache_config import FirstBlockCacheConfig, default_cache_config
from pipeline.errors import InvalidRequestError, ModelLoadError, NotFoundError
from pipeline.library import LoraLibrary
from pipeline.lora import LoraSet, normalize_loras
from pipeline.prompt_loras import parse_prompt_loras
from pipeline.samplers import DEFAULT_SAMPLER, SAMPLERS, canonical_sampler_name
from pipeline.seeds import MAX_SEED, resolve_seed

from pipeline.library import ModelCatalog
from deployments.settings import Limits

SIZE_MULTIPLE = 8


class ApiError(Exception):
    """A caller's mistake: ``field`` in the caller's own vocabulary, a status if not the route's
    default (400 for the OpenAI route, 422 elsewhere)."""

    def __init__(self, field: str, message: str, status: int | None = None,
                 code: str = "invalid_value") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status, self.code = field, message, status, code


Seed = Field(None, ge=-1, le=MAX_SEED, description="absent or -1: random")
Side = Field(None, ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)


class CacheRequest(BaseModel):
    """First Block Cache settings for one request; what is left out keeps the model family's
    default. ``{"threshold": 0}`` turns the cache off (the image is then exactly the uncached one)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0.0, allow_inf_nan=False,
                                    description="skip a step when the first block moved less than this")
    start: float | None = Field(None, ge=0.0, le=1.0, description="no skipping before this fraction")
    end: float | None = Field(None, ge=0.0, le=1.0, description="no skipping from this fraction on")
    max_consecutive_hits: int | None = Field(None, ge=1, description="null: no limit")
    mode: Literal["reuse", "residual"] | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields the caller set (an explicit null max_consecutive_hits means no limit)."""
        return self.model_dump(exclude_unset=True)


class LoraRequest(BaseModel):
    """One LoRA for one request: a file name (stem) in the server's loras folder, and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    weight: float = Field(1.0, ge=-10.0, le=10.0, allow_inf_nan=False)


MAX_LORAS = 8


# --- native -------------------------------------------------------------------------------------

class GenerateRequest(BaseModel):
    """POST /v1/generate. Unknown fields are refused so that a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    width: int | None = Side
    height: int | None = Side
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0, allow_inf_nan=False)
    seed: int | None = Seed
    sampler: str = DEFAULT_SAMPLER
    model: str | None = None
    cache: CacheRequest | None = None
    loras: list[LoraRequest] = Field(default_factory=list, max_length=MAX_LORAS)


# --- OpenAI Images API --------------------------------------------------------------------------

class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations; OpenAI-only knobs (quality, style, user...) are accepted and
    ignored, as a drop-in backend must."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    stream: bool | None = None
    negative_prompt: str | None = None  # not OpenAI's, but Open WebUI and others send it
    steps: int | None = Field(None, ge=1)
    seed: int | None = Seed
    cache: CacheRequest | None = None  # an extra body field: extra_body={"cache": {...}}
    loras: list[LoraRequest] = Field(default_factory=list, max_length=MAX_LORAS)  # extra body


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: Literal["png"] = "png"
    size: str | None = None


# --- AUTOMATIC1111 ------------------------------------------------------------------------------

class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. Defaults are the A1111 web UI's; A1111 fields Raydiance does not
    implement (hires fix, restore_faces, ...) are accepted and ignored, as A1111 does."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str | None = None
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, ge=0.0, allow_inf_nan=False)
    width: int | None = Side
    height: int | None = Side
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    override_settings: dict[str, Any] | None = None  # sd_model_checkpoint, cache
    cache: CacheRequest | None = None  # Raydiance's own field; or override_settings.cache


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


# --- one generation, whatever the API -----------------------------------------------------------

@dataclass
class Generation:
    """A request in API-neutral form; ``fields`` maps its names to the caller's for errors."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int | None = None
    sampler: str = DEFAULT_SAMPLER
    model: str | None = None
    count: int = 1
    cache: dict[str, Any] | None = None  # First Block Cache overrides of the family default
    loras: list[tuple[str, float]] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)

    def name(self, key: str) -> str:
        return self.fields.get(key, key)


@dataclass(frozen=True)
class Resolved:
    """A validated generation: every value concrete, the seed drawn."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    model: str
    count: int
    cache: FirstBlockCacheConfig
    loras: LoraSet = ()

    def infotext(self, seed: int) -> str:
        """A1111's "parameters" text, written into each PNG."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.guidance_scale:g}, "
                     f"Seed: {seed}, Size: {self.width}x{self.height}, Model: {self.model}")
        return "\n".join(lines)


def resolve(generation: Generation, catalog: ModelCatalog, default_model: str, limits: Limits,
            loras: LoraLibrary | None = None) -> Resolved:
    """Check ``generation`` against the served models and LoRAs and the configured limits."""
    g = generation
    model_name = g.model or default_model
    try:
        info = catalog.describe(model_name)
    except NotFoundError as error:
        raise ApiError(g.name("model"), error.message, status=404, code="model_not_found") from None
    except InvalidRequestError as error:  # a name with a path in it
        raise ApiError(g.name("model"), error.message) from None
    except ModelLoadError as error:
        raise ApiError(g.name("model"), str(error), status=422, code="model_unusable") from None
    width, height = g.width or info.native_size, g.height or info.native_size
    for key, value, limit in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if value % SIZE_MULTIPLE or value < SIZE_MULTIPLE:
            raise ApiError(g.name(key), f"{value} is not a positive multiple of {SIZE_MULTIPLE}")
        if value > limit:
            raise ApiError(g.name(key), f"{value} is above this server's limit of {limit}")
    if not 1 <= g.steps <= limits.max_steps:
        raise ApiError(g.name("steps"), f"{g.steps} is outside 1..{limits.max_steps}")
    if not 1 <= g.count <= limits.max_images:
        raise ApiError(g.name("count"), f"{g.count} images asked for; this server makes 1.."
                       f"{limits.max_images} per request")
    if not (0.0 <= g.guidance_scale < float("inf")):
        raise ApiError(g.name("guidance_scale"), "must be a finite number >= 0")
    for key, text in (("prompt", g.prompt), ("negative_prompt", g.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            raise ApiError(g.name(key), f"{len(text)} characters; the limit is {limits.max_prompt_chars}",
                           status=413, code="too_long")
    try:
        sampler = canonical_sampler_name(g.sampler)
    except InvalidRequestError as error:
        raise ApiError(g.name("sampler"), error.message) from None
    if g.seed is not None and g.seed > MAX_SEED:
        raise ApiError(g.name("seed"), f"must be -1 (random) or 0..{MAX_SEED}")
    try:
        cache = default_cache_config(info.family).with_overrides(g.cache)
    except InvalidRequestError as error:  # error.field is "cache.<name>"
        raise ApiError(g.name("cache") + error.field[len("cache"):], error.message) from None
    return Resolved(prompt=g.prompt, negative_prompt=g.negative_prompt, width=width, height=height,
                    steps=g.steps, guidance_scale=float(g.guidance_scale), seed=resolve_seed(g.seed),
                    sampler=sampler, model=model_name, count=g.count, cache=cache,
                    loras=_check_loras(g, loras))


def _check_loras(g: Generation, library: LoraLibrary | None) -> LoraSet:
    """Every named LoRA must be a file in the loras folder (404 naming it otherwise)."""
    if not g.loras:
        return ()
    if library is None:
        raise ApiError(g.name("loras"), "this server has no loras_dir configured", status=404,
                       code="lora_not_found")
    if len(g.loras) > MAX_LORAS:
        raise ApiError(g.name("loras"), f"{len(g.loras)} LoRAs; at most {MAX_LORAS} per request")
    for name, _ in g.loras:
        try:
            library.resolve(name)
        except NotFoundError as error:
            raise ApiError(g.name("loras"), error.message, status=404, code="lora_not_found") from None
        except InvalidRequestError as error:
            raise ApiError(g.name("loras"), error.message) from None
    return normalize_loras((name.removesuffix(".safetensors"), weight) for name, weight in g.loras)


def _lora_pairs(loras: list[LoraRequest]) -> list[tuple[str, float]]:
    return [(lora.name, lora.weight) for lora in loras]


def _cache_overrides(cache: CacheRequest | None) -> dict[str, Any] | None:
    return cache.overrides() if cache is not None else None


# --- API-specific mappings ----------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def from_native(body: GenerateRequest) -> Generation:
    return Generation(prompt=body.prompt, negative_prompt=body.negative_prompt, width=body.width,
                      height=body.height, steps=body.steps, guidance_scale=body.guidance_scale,
                      seed=body.seed, sampler=body.sampler, model=body.model,
                      cache=_cache_overrides(body.cache), loras=_lora_pairs(body.loras))


def from_openai(body: OpenAIImageRequest) -> Generation:
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
    width = height = None
    if body.size not in (None, "", "auto"):
        match = _SIZE.match(body.size)
        if not match:
            raise ApiError("size", f"{body.size!r} is not WIDTHxHEIGHT (e.g. '512x512') or 'auto'")
        width, height = int(match[1]), int(match[2])
    return Generation(prompt=body.prompt, negative_prompt=body.negative_prompt, width=width,
                      height=height, steps=body.steps or 20, seed=body.seed, model=body.model,
                      count=body.n, cache=_cache_overrides(body.cache), loras=_lora_pairs(body.loras),
                      fields={"width": "size", "height": "size", "count": "n"})


A1111_SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}


def from_txt2img(body: Txt2ImgRequest, selected_model: str | None) -> Generation:
    fields = {"guidance_scale": "cfg_scale", "sampler": "sampler_name", "count": "batch_size",
              "model": "override_settings.sd_model_checkpoint"}
    sampler = body.sampler_name or body.sampler_index or DEFAULT_SAMPLER
    scheduler = (body.scheduler or "automatic").strip().lower()
    if scheduler not in A1111_SCHEDULERS:
        raise ApiError("scheduler", f"{body.scheduler!r} is not served; choose one of "
                       f"{', '.join(A1111_SCHEDULERS.values())}")
    if scheduler == "karras" and not sampler.lower().endswith("karras"):
        if f"{sampler} Karras".lower() not in {s.lower() for s in SAMPLERS}:
            raise ApiError("scheduler", f"sampler {sampler!r} has no Karras variant here")
        sampler = f"{sampler} Karras"
    overrides = body.override_settings or {}
    model = overrides.get("sd_model_checkpoint")
    if model is None:
        model, fields["model"] = selected_model, "sd_model_checkpoint"
    cache = _cache_overrides(body.cache)
    if "cache" in overrides:  # A1111 clients can pass only override_settings through
        if body.cache is not None:
            raise ApiError("cache", "give cache or override_settings.cache, not both")
        cache, fields["cache"] = _a1111_cache(overrides["cache"]), "override_settings.cache"
    try:  # A1111's extra-network syntax: <lora:name:weight> in the prompt, stripped before CLIP
        prompt, loras = parse_prompt_loras(body.prompt)
    except InvalidRequestError as error:
        raise ApiError("prompt", error.message) from None
    fields["loras"] = "prompt"
    return Generation(prompt=prompt, negative_prompt=body.negative_prompt or None,
                      width=body.width, height=body.height, steps=body.steps,
                      guidance_scale=body.cfg_scale, seed=body.seed, sampler=sampler,
                      model=model, count=body.batch_size * body.n_iter, cache=cache, loras=loras,
                      fields=fields)


def _a1111_cache(value: Any) -> dict[str, Any]:
    """``override_settings.cache`` checked as the native ``cache`` is, errors named in place."""
    try:
        return CacheRequest.model_validate(value).overrides()
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        name = "override_settings.cache" + (f".{where}" if where else "")
        raise ApiError(name, first["msg"]) from None
