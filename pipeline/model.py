"""A Stable Diffusion-family model as a stage holds it: what the model is, and which parts are loaded.

Each stage loads only the components it runs (``Component``): the TextEncoder the tokenizers and
text encoders, the Denoiser the UNet, the VAE stage the VAE. What every stage may need besides
its own part is small JSON (the UNet's, VAE's and scheduler's configs), so it is always there;
touching a component that was not loaded raises ``MissingComponentError`` rather than quietly
holding a second copy of a model on a card that has no room for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from pipeline.errors import MissingComponentError
from pipeline.model_configs import COMPONENTS, Component, Family, ModelConfigs, text_encoder_names
from pipeline.unet.parts import EAGER, UNetParts

T = TypeVar("T")


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
