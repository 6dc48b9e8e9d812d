"""Upscalers of the hires fix, by their A1111 names: the first pass's latents made the size of
the second pass's start, in latent space (the ``Latent*`` modes: an interpolation, no VAE) or
in pixels (decoded, resized with Pillow, encoded again)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.init_image import InitImage
from pipeline.model import DiffusionModel
from pipeline.upscaler_names import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS
from pipeline.vae import decode_latents, encode_pixels


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(1, C, h, w) latents at latent ``size`` (h, w), by the latent mode ``mode``."""
    method, antialias = LATENT_UPSCALE_MODES[mode]
    kwargs = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(latents.float(), size=size, mode=method, antialias=antialias,
                         **kwargs).to(latents.dtype)


@torch.inference_mode()
def upscale_for_second_pass(model: DiffusionModel, latents: torch.Tensor, width: int,
                            height: int, upscaler: str) -> InitImage:
    """The hires fix's second pass's start: ``latents`` (1, C, h, w) brought to ``width`` x
    ``height`` pixels by ``upscaler``. Pixel upscalers need the model's VAE."""
    factor = model.vae_scale_factor
    if upscaler in LATENT_UPSCALE_MODES:
        upscaled = upscale_latents(latents, (height // factor, width // factor), upscaler)
    else:
        pixels = decode_latents(model, latents)[0]
        resized = Image.fromarray(pixels).resize((width, height), PIXEL_UPSCALERS[upscaler])
        upscaled = encode_pixels(model, np.asarray(resized)[None])
    return InitImage(upscaled.to("cpu"), None, None, None)
