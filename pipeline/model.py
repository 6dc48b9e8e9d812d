"""A Stable Diffusion-family model as a stage holds it: what the model is, and which parts are loaded.

Each stage loads only the components it runs (``Component``): the TextEncoder the tokenizers and
text encoders, the Denoiser the UNet, the VAE stage the VAE. What every stage may need besides
its own part is small JSON (the UNet's, VAE's and scheduler's configs), so it is always there;
touching a component that was not loaded raises ``MissingComponentError`` rather than quietly
holding a second copy of a model on a card that has no room for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from pipeline.errors import MissingComponentError
from pipeline.preview import FAMILY_LATENT_RGB, LatentRGB
from pipeline.unet.parts import EAGER, UNetParts

Family = Literal["sd15", "sdxl"]
Component = Literal["text_encoders", "unet", "vae"]
COMPONENTS: tuple[Component, ...] = ("text_encoders", "unet", "vae")
"""Loadable parts, each what one stage runs; ``text_encoders`` comes with its tokenizers."""
_TEXT_ENCODERS: dict[Family, tuple[tuple[str, str], ...]] = {
    "sd15": (("tokenizer", "text_encoder"),),
    "sdxl": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
}

T = TypeVar("T")


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


@dataclass
class TextEncoders:
    """The tokenizers and text encoders, one pair per encoder (SDXL: two, the second pooled)."""

    tokenizers: list[CLIPTokenizer]
    encoders: list[torch.nn.Module]


@dataclass(eq=False)
class DiffusionModel:
    """One model's configs and the components this process loaded of it, each on its device."""

    name: str
    configs: ModelConfigs
    loaded: dict[Component, Any] = field(default_factory=dict)  # TextEncoders, UNet, VAE
    # How the engine runs the UNet: eager, or compiled (``pipeline.unet.compiled``, a Denoiser's
    # model configured with ``compile: true``); the runner hands it to the cache strategy.
    unet_parts: UNetParts = EAGER

    @property
    def family(self) -> Family:
        return self.configs.family

    @property
    def unet_config(self) -> dict[str, Any]:
        return self.configs.unet

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.configs.scheduler

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return self.configs.force_zeros_for_empty_prompt

    @property
    def components(self) -> tuple[Component, ...]:
        """The loaded components, in pipeline order."""
        return tuple(c for c in COMPONENTS if c in self.loaded)

    def _component(self, component: Component, kind: type[T]) -> T:
        part = self.loaded.get(component)
        if part is None:
            held = ", ".join(self.components) or "nothing"
            raise MissingComponentError(f"model {self.name!r}: {component} not loaded in this "
                                        f"process, which holds {held}")
        return part

    @property
    def unet(self) -> UNet2DConditionModel:
        return self._component("unet", UNet2DConditionModel)

    @property
    def vae(self) -> AutoencoderKL:
        return self._component("vae", AutoencoderKL)

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return self._component("text_encoders", TextEncoders).tokenizers

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self._component("text_encoders", TextEncoders).encoders

    def modules(self) -> dict[str, torch.nn.Module]:
        """The loaded weights by diffusers' component names: ``text_encoder``, ``text_encoder_2``,
        ``unet``, ``vae`` (tokenizers hold no tensors)."""
        modules: dict[str, torch.nn.Module] = {}
        if "text_encoders" in self.loaded:
            modules.update(zip(text_encoder_names(self.family), self.text_encoders))
        if "unet" in self.loaded:
            modules["unet"] = self.unet
        if "vae" in self.loaded:
            modules["vae"] = self.vae
        return modules

    @property
    def vae_scale_factor(self) -> int:
        return self.configs.description.vae_scale_factor

    @property
    def native_size(self) -> int:
        """The side in pixels the model was trained at (64 tiny-shapes, 512 SD1.5, 1024 SDXL)."""
        return self.configs.description.native_size

    @property
    def latent_channels(self) -> int:
        """Channels of the latents (the UNet's output): 4 for SD1.5 and SDXL."""
        return int(self.configs.unet["out_channels"])

    @property
    def is_inpainting(self) -> bool:
        """An inpainting UNet (9 input channels): it also takes the mask and the masked image's
        latents beside the noisy latents."""
        return int(self.configs.unet["in_channels"]) == self.latent_channels + 5


def text_encoder_parts(family: Family) -> tuple[tuple[str, str], ...]:
    """(tokenizer, text encoder) component names, in order: SD1.5's one pair, SDXL's two (the
    second pooled), as diffusers' folders, LoRA files and ``modules()`` name them."""
    return _TEXT_ENCODERS[family]


def text_encoder_names(family: Family) -> tuple[str, ...]:
    return tuple(encoder for _, encoder in _TEXT_ENCODERS[family])
