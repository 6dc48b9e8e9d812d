"""One generation, whatever the dialect: the neutral request, checked against this server.

Each dialect maps its body onto ``ServedModels.resolve``, which looks the model and LoRAs up,
fills the defaults, checks the config's limits (in one place, ``_check_limits``), merges the
cache settings with the family's default and draws the seed. Its errors name the caller's own
fields: the dialect passes its names for the neutral ones.

Looking a model or LoRA up stats files and may read a checkpoint's header: the dialects call
``resolve`` and the listings here through ``asyncio.to_thread``, never on the event loop.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline.embedding_library import EmbeddingInfo, EmbeddingLibrary, PromptEmbeddings
from pipeline.errors import InvalidRequestError
from pipeline.request_params import SourceImage
from pipeline.library import LoraLibrary, ModelCatalog, ModelInfo
from pipeline.lora_set import LoraSet, normalize_loras
from pipeline.sampler_names import DEFAULT_SCHEDULE, resolve_sampler
from pipeline.seeds import MAX_SEED, resolve_seed
from pipeline.unet.cache_config import FirstBlockCacheConfig, default_cache_config

from deployments.api.errors import ApiError, in_callers_terms
from deployments.api.protocol import MAX_LORAS, CacheRequest
from deployments.settings import Limits


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: after the first pass, upscale to ``width`` x ``height`` and redraw
    ``strength`` of it in a second pass of ``steps`` steps with ``sampler``."""

    width: int
    height: int
    upscaler: str
    steps: int
    strength: float
    sampler: str


@dataclass(frozen=True)
class Generation:
    """A request every dialect agrees on: every value concrete and within this server's limits,
    the seed drawn. Image ``i`` of ``count`` gets seed ``seed + i``."""

    prompt: str
    negative_prompt: str | None
    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    count: int
    cache: FirstBlockCacheConfig
    loras: LoraSet = ()
    scheduler: str = DEFAULT_SCHEDULE  # the schedule, as A1111 labels it: Karras, Exponential...
    # image to image: the image it starts from (sized to the request) and how much is redrawn
    source: SourceImage | None = dataclasses.field(default=None, compare=False, repr=False)
    strength: float = 1.0
    hires: HiresFix | None = None  # a second pass at a larger size (txt2img only)
    clip_skip: int = 1  # A1111's CLIP_stop_at_last_layers (1: the last layer)
    embeddings: PromptEmbeddings = ()  # textual inversions the prompts name, with file versions

    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.count)]

    def infotext(self, seed: int) -> str:
        """A1111's "parameters" text, written into each PNG."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(f"Steps: {self.steps}, Sampler: {self.sampler}, Schedule type: {self.scheduler}, "
                     f"CFG scale: {self.guidance_scale:g}, Seed: {seed}, Size: {self.width}x{self.height}, "
                     f"Model: {self.model}"
                     + (f", Denoising strength: {self.strength:g}" if self.source else "")
                     + (f", Hires upscale: {self.hires.width}x{self.hires.height}, Hires "
                        f"upscaler: {self.hires.upscaler}, Hires steps: {self.hires.steps}, "
                        f"Denoising strength: {self.hires.strength:g}" if self.hires else "")
                     + (f", Clip skip: {self.clip_skip}" if self.clip_skip != 1 else ""))
        return "\n".join(lines)


class ServedModels:
    """What this server serves and allows: its models, its LoRAs, its textual inversion
    embeddings and its limits."""

    def __init__(self, catalog: ModelCatalog, default_model: str, limits: Limits,
                 loras: LoraLibrary | None, aliases: Mapping[str, str] | None = None,
                 embeddings: EmbeddingLibrary | None = None) -> None:
        self.catalog, self.default_model, self.limits, self.loras = catalog, default_model, limits, loras
        self.aliases = dict(aliases or {})  # checked at deploy (``model_aliases``)
        self.embeddings = embeddings

    def model_name(self, name: str) -> str:
        """The served model ``name`` means: an alias's model, unless a model of that name has
        since been copied into the checkpoints folder (the model wins)."""
        target = self.aliases.get(name)
        if target is None:
            return name
        try:
            self.catalog.path(name)
            return name
        except InvalidRequestError:  # NotFoundError, or a name no file could have
            return target

    def describe(self, name: str, field: str = "model") -> ModelInfo:
        """A served model's metadata (an alias's model's); 404 naming ``field`` for a name that
        is not served."""
        with in_callers_terms({"model": field}):
            return self.catalog.describe(self.model_name(name))

    def lora_names(self) -> list[str]:
        return self.loras.names() if self.loras is not None else []

    def lora_files(self) -> list[tuple[str, Path]]:
        """Each LoRA's name and file (A1111 lists both)."""
        if self.loras is None:
            return []
        return [(name, self.loras.resolve(name)) for name in self.loras.names()]

    def embedding_listing(self) -> tuple[dict[str, EmbeddingInfo], dict[str, str]]:
        """(usable embeddings by name, skipped files with the reason): headers read, pickles not."""
        return self.embeddings.listing() if self.embeddings is not None else ({}, {})

    def prompt_embeddings(self, prompt: str, negative_prompt: str | None) -> PromptEmbeddings:
        """The embeddings the prompts name, with their files' versions (none without a folder)."""
        if self.embeddings is None:
            return ()
        return self.embeddings.lookup(prompt, negative_prompt)

    def resolve(self, names: Mapping[str, str], *, prompt: str, negative_prompt: str | None,
                model: str | None, width: int | None, height: int | None, steps: int,
                guidance_scale: float, sampler: str | None, seed: int | None, count: int,
                cache: CacheRequest | None, loras: Sequence[tuple[str, float]],
                scheduler: str | None = None, clip_skip: int = 1) -> Generation:
        """The ``Generation`` a dialect's fields ask for; ``names`` maps the neutral field names
        (``count``, ``cache``...) to the dialect's, for the errors. The fields' fixed bounds were
        checked with the body (``deployments.api.protocol``). ``scheduler`` is the schedule
        (absent: Automatic); ``sampler`` may be an older combined name (``DPM++ 2M Karras``)."""
        with in_callers_terms(names):
            info = self.catalog.describe(self.model_name(model or self.default_model))
            width = info.native_size if width is None else width  # 0 is no size: ImageSide refuses it
            height = info.native_size if height is None else height
            _check_limits(self.limits, width=width, height=height, steps=steps, count=count,
                          prompt=prompt, negative_prompt=negative_prompt or "")
            overrides = cache.overrides() if cache is not None else None
            sampler, scheduler = resolve_sampler(sampler, scheduler, info.family)
            return Generation(
                prompt=prompt, negative_prompt=negative_prompt, model=info.name, width=width,
                height=height, steps=steps, guidance_scale=float(guidance_scale),
                sampler=sampler, scheduler=scheduler, seed=resolve_seed(seed),
                count=count, cache=default_cache_config(info.family).with_overrides(overrides),
                loras=self._checked_loras(loras), clip_skip=clip_skip,
                embeddings=self.prompt_embeddings(prompt, negative_prompt))

    def _checked_loras(self, loras: Sequence[tuple[str, float]]) -> LoraSet:
        """Every named LoRA must be a file in the loras folder (404 naming it otherwise)."""
        if not loras:
            return ()
        if self.loras is None:
            raise ApiError("loras", "this server has no loras_dir configured", status=404,
                           code="lora_not_found")
        if len(loras) > MAX_LORAS:
            raise ApiError("loras", f"{len(loras)} LoRAs; at most {MAX_LORAS} per request")
        for name, _ in loras:
            self.loras.resolve(name)
        return normalize_loras((name.removesuffix(".safetensors"), weight) for name, weight in loras)


def _check_limits(limits: Limits, *, width: int, height: int, steps: int, count: int,
                  prompt: str, negative_prompt: str) -> None:
    """The bounds this server's config sets (``limits`` in serve_config.yaml)."""
    for field, value, limit in (("width", width, limits.max_width), ("height", height, limits.max_height),
                                ("steps", steps, limits.max_steps)):
        if value > limit:
            raise ApiError(field, f"{value} is above this server's limit of {limit}")
    if count > limits.max_images:
        raise ApiError("count", f"{count} images asked for; this server makes 1.."
                       f"{limits.max_images} per request")
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise ApiError(field, f"{len(text)} characters; the limit is {limits.max_prompt_chars}",
                           status=413, code="too_long")
