"""Choosing the torch device and dtype a stage runs on.

Ray may hand a replica GPU ids while CUDA is not usable (a fake GPU node in tests, a broken
driver): CUDA is used only when torch says it is available.
"""
from __future__ import annotations

import torch

from pipeline.accelerator import Accelerator


def select_device(accelerator: Accelerator = "auto") -> torch.device:
    if accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator == "cuda":
        raise RuntimeError("accelerator 'cuda' was asked for but torch.cuda.is_available() is False")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs (what SD checkpoints are made for), fp32 on CPUs (where fp16 is slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def vae_dtype(vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in fp16 (its config says ``force_upcast``): it runs in fp32."""
    if dtype == torch.float16 and vae_config.get("force_upcast", True):
        return torch.float32
    return dtype


def for_inference(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A loaded component moved to its stage's device, in eval mode, with no gradients."""
    return module.to(device).eval().requires_grad_(False)
