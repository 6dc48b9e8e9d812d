"""Latent previews: what an image looks like mid-denoising, without its VAE.

A linear map from the latent channels to RGB (ComfyUI's and A1111's "Approx cheap" preview) costs
a few multiply-adds per latent pixel, so the Denoiser can show every step of a request whose
caller watches, although it holds no VAE. The map is the family's published one, or a model's own
(``vae/latent_rgb.json`` in a diffusers folder, fitted by ``tools/fit_latent_rgb.py``) where its
VAE is not the family's, as the built-in model's is not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # no torch import here: the API process reads model metadata through this module
    import torch

LATENT_RGB_FILE = "vae/latent_rgb.json"


@dataclass(frozen=True)
class LatentRGB:
    """RGB in [-1, 1] = latents (as the UNet sees them) @ ``factors`` + ``bias``."""

    factors: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def from_json(cls, data: dict) -> LatentRGB:
        return cls(tuple(tuple(float(v) for v in row) for row in data["factors"]),
                   tuple(float(v) for v in data.get("bias", (0.0, 0.0, 0.0))))

    def to_json(self) -> dict:
        return {"factors": [list(row) for row in self.factors], "bias": list(self.bias)}

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """(C, h, w) latents -> (h, w, 3) uint8 RGB on the CPU (one small copy off the device)."""
        if latents.shape[0] != len(self.factors):
            raise ValueError(f"{latents.shape[0]} latent channels, the preview map has "
                             f"{len(self.factors)}")
        weight = latents.new_tensor(self.factors).float()
        bias = latents.new_tensor(self.bias).float()
        rgb = latents.detach().float().movedim(0, -1) @ weight + bias
        return ((rgb + 1) * 127.5).clamp(0, 255).round().byte().cpu().numpy()


FAMILY_LATENT_RGB: dict[str, LatentRGB] = {  # ComfyUI's comfy/latent_formats.py
    "sd15": LatentRGB(((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                       (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))),
    "sdxl": LatentRGB(((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                       (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
                      (0.1084, -0.0175, -0.0011)),
}


def read_latent_rgb(folder: Path) -> LatentRGB | None:
    """A diffusers folder's own preview map, if it ships one."""
    file = folder / LATENT_RGB_FILE
    return LatentRGB.from_json(json.loads(file.read_text())) if file.is_file() else None
