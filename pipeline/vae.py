"""The VAE both ways, as diffusers' pipelines do it: uint8 pixels to scaled latents (an init
image) and latents back to uint8 pixels."""
from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from pipeline.model import DiffusionModel


def _channel_stats(latents: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SDXL-family VAEs may declare a per-channel mean and std of their latents."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    return (torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1),
            torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1))


def _unscale(latents: torch.Tensor, config) -> torch.Tensor:
    """Undo the VAE's latent scaling."""
    stats = _channel_stats(latents, config)
    if stats is None:
        return latents / config.scaling_factor
    mean, std = stats
    return latents * std / config.scaling_factor + mean


def _scale(latents: torch.Tensor, config) -> torch.Tensor:
    """The VAE's latent scaling, as the UNet expects its latents (``_unscale`` undone)."""
    stats = _channel_stats(latents, config)
    if stats is None:
        return latents * config.scaling_factor
    mean, std = stats
    return (latents - mean) * config.scaling_factor / std


@torch.inference_mode()
def encode_pixels(model: DiffusionModel, pixels: np.ndarray) -> torch.Tensor:
    """Encode (batch, H, W, 3) uint8 RGB to (batch, C, h, w) scaled latents on the CPU (in the
    VAE's dtype: the Denoiser casts them to its UNet's). The posterior's mode, not a sample: an init image encodes the same for every
    seed, and the seed's noise comes in the denoising (as A1111 does)."""
    vae = model.vae
    processor = VaeImageProcessor(vae_scale_factor=model.vae_scale_factor)
    images = processor.preprocess(pixels.astype(np.float32) / 255.0)
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return _scale(posterior.mode(), vae.config).to("cpu")


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
