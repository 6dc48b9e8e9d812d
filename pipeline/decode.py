"""VAE decoding: latents to uint8 pixels, as diffusers' pipelines do it."""
from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from pipeline.model import DiffusionModel


def _unscale(latents: torch.Tensor, config) -> torch.Tensor:
    """Undo the VAE's latent scaling (SDXL-family VAEs may also declare a per-channel mean and std)."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return latents / config.scaling_factor
    mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    return latents * std / config.scaling_factor + mean


@torch.inference_mode()
def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> np.ndarray:
    """Decode (batch, C, h, w) latents to (batch, H, W, 3) uint8 RGB.

    The VAE may hold a wider dtype than the UNet (SDXL's VAE overflows in fp16, so the loader
    keeps it in fp32): latents are cast to the VAE's own dtype first. Pixels come from diffusers'
    ``VaeImageProcessor.postprocess``, the conversion its pipelines use.
    """
    vae = model.vae
    latents = _unscale(latents.to(device=vae.device, dtype=vae.dtype), vae.config)
    images = vae.decode(latents, return_dict=False)[0]
    pil = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor).postprocess(images, output_type="pil")
    return np.stack([np.asarray(image) for image in pil])
