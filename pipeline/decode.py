"""VAE decoding: latents to uint8 pixels, as diffusers' pipelines do it."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.model import DiffusionModel


@torch.inference_mode()
def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> np.ndarray:
    """Decode (batch, C, h, w) latents to (batch, H, W, 3) uint8 RGB.

    The VAE may hold a wider dtype than the UNet (SDXL's VAE overflows in fp16, so the loader
    keeps it in fp32): latents are cast to the VAE's own dtype first.
    """
    vae = model.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, device=vae.device, dtype=vae.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=vae.device, dtype=vae.dtype).view(1, -1, 1, 1)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    pixels = vae.decode(latents, return_dict=False)[0]
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    return (pixels.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
