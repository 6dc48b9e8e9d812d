"""Loading a Stable Diffusion-family model, a diffusers folder or a single-file checkpoint, by component.

Local files only, safetensors only: pickle formats are refused before anything is read. A stage
names the components it runs (``pipeline.model_configs.COMPONENTS``) and gets those alone.
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from pipeline import diffusers_folder
from pipeline.checkpoints.load import load_checkpoint
from pipeline.model import DiffusionModel
from pipeline.model_configs import COMPONENTS, Component
from pipeline.model_files import existing_model


def load_model(path: str | Path, *, components: Collection[Component] = COMPONENTS,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               name: str | None = None) -> DiffusionModel:
    """Load ``components`` (all by default) of an SD1.5 or SDXL diffusers folder or single
    ``.safetensors`` checkpoint; never reaches the network, never unpickles."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    path = existing_model(path)
    if path.is_file():
        return load_checkpoint(path, components=components, device=device, dtype=dtype, name=name)
    return diffusers_folder.load_folder(path, components=components, device=device, dtype=dtype, name=name)
