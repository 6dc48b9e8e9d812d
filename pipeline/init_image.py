"""What an image-to-image request starts from: its image as latents, and for inpainting its mask.

The VAE stage builds an ``InitImage`` once per request (``encode_init_images``); every seed's
``Trajectory`` starts from it part-way along its schedule (``DenoiseParams.strength``), and the
VAE stage pastes the generated pixels into the original through the mask (``overlay``), as
A1111 does for inpainting with ordinary (4-channel) UNets: outside the mask the answer is the
input, pixel for pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import DiffusionModel
from pipeline.request_params import InpaintingFill, SourceImage
from pipeline.vae import encode_pixels


@dataclass
class InitImage:
    """A request's start, encoded: CPU tensors and arrays only (it crosses stages)."""

    latents: torch.Tensor  # (1, C, h, w), scaled as the UNet expects
    mask: torch.Tensor | None  # (1, 1, h, w) in [0, 1], 1: repaint; None: plain img2img
    pixels: np.ndarray | None  # (H, W, 3) uint8: the original, for ``overlay`` (inpainting)
    pixel_mask: np.ndarray | None  # (H, W) float32 in [0, 1]
    fill: InpaintingFill = "original"
    # for an inpainting UNet (9 channels): the image with the masked area grey, encoded
    masked_latents: torch.Tensor | None = None

    def overlay(self, generated: np.ndarray) -> np.ndarray:
        """``generated`` (H, W, 3) uint8 inside the mask, the original outside it."""
        if self.pixel_mask is None or self.pixels is None:
            return generated
        weight = self.pixel_mask[..., None]
        mixed = generated.astype(np.float32) * weight + self.pixels.astype(np.float32) * (1 - weight)
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)

    def start_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The latents the schedule starts from, on ``noise``'s device and dtype: the image's,
        with the masked area replaced as ``fill`` asks."""
        latents = self.latents.to(device=noise.device, dtype=noise.dtype)
        if self.mask is None or self.fill in ("original", "fill"):
            return latents
        keep = 1 - self.mask.to(device=noise.device, dtype=noise.dtype)
        return latents * keep + (noise * (1 - keep) if self.fill == "latent noise" else 0)


def latent_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (H, W) uint8 as a (1, 1, h, w) float mask at latent ``size``: area-averaged,
    so a latent pixel is as much repainted as its pixels are."""
    pixels = torch.from_numpy(mask.astype(np.float32) / 255.0)[None, None]
    return F.interpolate(pixels, size=size, mode="area").clamp_(0, 1)


def encode_init_images(model: DiffusionModel, sources: Sequence[SourceImage]) -> list[InitImage]:
    """One VAE forward for ``sources`` of one size (two for an inpainting UNet's masks)."""
    latents = encode_pixels(model, np.stack([source.pixels for source in sources]))
    size = tuple(latents.shape[-2:])
    masked = _masked_latents(model, sources)
    return [InitImage(latents[i:i + 1].clone(),
                      None if source.mask is None else latent_mask(source.mask, size),
                      source.pixels,
                      None if source.mask is None else source.mask.astype(np.float32) / 255.0,
                      source.fill, None if masked is None else masked[i:i + 1].clone())
            for i, source in enumerate(sources)]


def _masked_latents(model: DiffusionModel, sources: Sequence[SourceImage]) -> torch.Tensor | None:
    """An inpainting UNet's masked image: the pixels under the (binarized) mask grey, as
    diffusers' inpainting pipeline makes it; None for other UNets."""
    if not model.is_inpainting or all(source.mask is None for source in sources):
        return None
    grey = np.full_like(sources[0].pixels, 127)
    masked = np.stack([source.pixels if source.mask is None
                       else np.where(source.mask[..., None] >= 128, grey, source.pixels)
                       for source in sources])
    return encode_pixels(model, masked)


def inpainting_conditioning(init: InitImage | None, latents: torch.Tensor) -> torch.Tensor:
    """An inpainting UNet's 5 extra input channels (the latent mask, the masked image's
    latents), on ``latents``' device and dtype. Without an init image or mask everything is to
    be drawn: mask 1, masked image zeros."""
    shape = (1, 1, *latents.shape[-2:])
    if init is None or init.mask is None or init.masked_latents is None:
        mask, masked = torch.ones(shape), torch.zeros((1, latents.shape[1], *latents.shape[-2:]))
    else:
        mask, masked = (init.mask >= 0.5).to(init.mask.dtype), init.masked_latents
    return torch.cat([mask, masked], dim=1).to(device=latents.device, dtype=latents.dtype)
