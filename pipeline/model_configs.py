"""What a model is, before any of its weights: its family, its parts, and the small JSON configs.

Every process that names models needs this (the API checks a request against a model's family
and native size; each stage reads the scheduler's and VAE's configs), while only a stage needs
torch, diffusers or transformers; so this module imports none of them. ``pipeline.model`` adds
the loaded weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.preview import FAMILY_LATENT_RGB, LatentRGB

Family = Literal["sd15", "sdxl"]
Component = Literal["text_encoders", "unet", "vae"]
COMPONENTS: tuple[Component, ...] = ("text_encoders", "unet", "vae")
"""Loadable parts, each what one stage runs; ``text_encoders`` comes with its tokenizers."""
_TEXT_ENCODERS: dict[Family, tuple[tuple[str, str], ...]] = {
    "sd15": (("tokenizer", "text_encoder"),),
    "sdxl": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
}


@dataclass(frozen=True)
class ModelDescription:
    """What a catalog needs to know of a model without loading its weights."""

    family: Family
    native_size: int  # the side in pixels the model was trained at
    vae_scale_factor: int

    @classmethod
    def from_configs(cls, family: Family, unet_config: dict[str, Any],
                     vae_config: dict[str, Any]) -> ModelDescription:
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        return cls(family, int(unet_config["sample_size"]) * factor, factor)


@dataclass(frozen=True)
class ModelConfigs:
    """What every stage knows of a model before any weight: its family and the small JSON configs
    (from a folder's files or a checkpoint's header)."""

    family: Family
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    own_latent_rgb: LatentRGB | None = None  # a VAE not the family's brings its preview map

    @property
    def latent_rgb(self) -> LatentRGB:
        """The linear latent-to-RGB map of the step previews."""
        return self.own_latent_rgb or FAMILY_LATENT_RGB[self.family]

    @classmethod
    def with_index(cls, family: Family, model_index: dict[str, Any], *, unet: dict[str, Any],
                   vae: dict[str, Any], scheduler: dict[str, Any],
                   latent_rgb: LatentRGB | None = None) -> ModelConfigs:
        """The configs, the empty-prompt rule from ``model_index.json``'s entries; where they do
        not say, diffusers' pipelines' own default (SDXL zeroes it, SD1.5 encodes it)."""
        force_zeros = bool(model_index.get("force_zeros_for_empty_prompt", family == "sdxl"))
        return cls(family, unet, vae, scheduler, force_zeros, latent_rgb)

    @property
    def description(self) -> ModelDescription:
        return ModelDescription.from_configs(self.family, self.unet, self.vae)


def text_encoder_parts(family: Family) -> tuple[tuple[str, str], ...]:
    """(tokenizer, text encoder) component names, in order: SD1.5's one pair, SDXL's two (the
    second pooled), as diffusers' folders, LoRA files and ``modules()`` name them."""
    return _TEXT_ENCODERS[family]


def text_encoder_names(family: Family) -> tuple[str, ...]:
    return tuple(encoder for _, encoder in _TEXT_ENCODERS[family])
