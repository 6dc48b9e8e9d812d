"""Choosing the torch device and dtype a stage runs on.

Ray may hand a replica GPU ids while CUDA is not usable (a fake GPU node in tests, a broken
driver): CUDA is used only when torch says it is available.
"""
from __future__ import annotations

from typing import Literal

import torch

Accelerator = Literal["auto", "cpu", "cuda"]


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
