"""What a request asks the stages for, as plain values: one image's denoising settings, and an
init image as the caller sent it. The API builds these and sends them on; no torch here, so the
API process never imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.sampler_names import DEFAULT_SAMPLER, DEFAULT_SCHEDULE
from pipeline.unet.cache_config import FirstBlockCacheConfig


@dataclass(frozen=True)
class DenoiseParams:
    """One image's denoising settings."""

    width: int
    height: int
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    schedule: str = DEFAULT_SCHEDULE  # A1111's scheduler: Karras, Exponential... (pipeline.sampler_names)
    cache: FirstBlockCacheConfig | None = None  # First Block Cache; None: off (the API fills family defaults)
    strength: float = 1.0  # with an init image: the fraction of the schedule run (1: all of it)


InpaintingFill = Literal["fill", "original", "latent noise", "latent nothing"]
"""A1111's ``inpainting_fill`` (0-3): what the masked area starts from. ``fill`` is applied to
the pixels before encoding (by the caller); the latent ones in the ``Trajectory``."""


@dataclass(frozen=True)
class SourceImage:
    """An init image as the caller sent it, sized to the request: what the VAE stage encodes."""

    model: str
    pixels: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None = None  # (H, W) uint8, 255: repaint; already blurred and inverted
    fill: InpaintingFill = "original"
