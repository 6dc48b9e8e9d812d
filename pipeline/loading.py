"""Loading a Stable Diffusion-family model, a diffusers folder or a single-file checkpoint, by component.

Local files only, safetensors only: pickle formats are refused before anything is read. A stage
names the components it runs (``pipeline.model.COMPONENTS``) and gets those alone.
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from pipeline import diffusers_folder
from pipeline.checkpoints import describe_checkpoint, load_checkpoint
from pipeline.errors import ModelLoadError
from pipeline.model import COMPONENTS, Component, DiffusionModel, ModelDescription
from pipeline.pickles import refuse_pickles


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model")
    refuse_pickles(path)
    return path


def describe_model(path: str | Path) -> ModelDescription:
    """Family, native size and VAE scale of a diffusers folder (its JSON files) or a single-file
    checkpoint (its header: key names, shapes and metadata), reading no weights."""
    path = _existing(path)
    if path.is_file():
        return describe_checkpoint(path)
    return diffusers_folder.read_configs(path).description


def load_model(path: str | Path, *, components: Collection[Component] = COMPONENTS,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               name: str | None = None) -> DiffusionModel:
    """Load ``components`` (all by default) of an SD1.5 or SDXL diffusers folder or single
    ``.safetensors`` checkpoint; never reaches the network, never unpickles."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    path = _existing(path)
    if path.is_file():
        return load_checkpoint(path, components=components, device=device, dtype=dtype, name=name)
    return diffusers_folder.load_folder(path, components=components, device=device, dtype=dtype, name=name)
