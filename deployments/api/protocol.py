"""The request fields the three dialects share, their bounds declared once as ``Annotated`` types.

Pydantic checks these while parsing a body, so a value out of bounds is refused naming the
caller's own field before anything else runs. Bounds that come from the app's config
(``limits``) are checked later, in one place: ``ServedModels.resolve``.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.seeds import MAX_SEED
from pipeline.unet.cache_config import CacheMode, RunLimit, ScheduleFraction, Threshold

SIZE_MULTIPLE = 8  # the VAE halves the side three times
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 5.0
MAX_LORAS = 8  # per request, checked in ServedModels.resolve (A1111 tags them into the prompt)

ImageSide = Annotated[int, Field(ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)]
Steps = Annotated[int, Field(ge=1)]
GuidanceScale = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-1, le=MAX_SEED, description="-1 (or absent): random")]
ImageCount = Annotated[int, Field(ge=1)]
LoraWeight = Annotated[float, Field(ge=-10.0, le=10.0, allow_inf_nan=False)]


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
    mode: CacheMode | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields the caller set, for ``FirstBlockCacheConfig.with_overrides``."""
        return self.model_dump(exclude_unset=True)


class LoraRequest(BaseModel):
    """One LoRA for one request: a file name (stem) in the server's loras folder, and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    weight: LoraWeight = 1.0


def lora_pairs(loras: list[LoraRequest]) -> list[tuple[str, float]]:
    return [(lora.name, lora.weight) for lora in loras]
