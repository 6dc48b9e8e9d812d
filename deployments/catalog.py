"""What the Ingress knows about each served model, read from its folder's JSON files.

The Ingress validates sizes and lists models without loading any weights: family, native size
and VAE scale factor all live in the diffusers folder's config files.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from pipeline.errors import ModelLoadError
from pipeline.model import _FAMILY_BY_PIPELINE, refuse_pickles  # one family table, not two


class ModelInfo(BaseModel):
    name: str
    path: str
    family: str
    native_size: int
    vae_scale_factor: int


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: {error}") from error


def describe_model(name: str, path: Path) -> ModelInfo:
    """Read a diffusers folder's metadata; raises ModelLoadError for anything not servable."""
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"models.{name}: {path} is not a diffusers model folder "
                             "(no model_index.json)")
    refuse_pickles(path)
    index = _read_json(path / "model_index.json")
    family = _FAMILY_BY_PIPELINE.get(index.get("_class_name", ""))
    if family is None:
        raise ModelLoadError(f"models.{name}: pipeline {index.get('_class_name')!r} is not SD1.5 or SDXL")
    unet = _read_json(path / "unet" / "config.json")
    vae = _read_json(path / "vae" / "config.json")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return ModelInfo(name=name, path=str(path), family=family,
                     native_size=int(unet["sample_size"]) * factor, vae_scale_factor=factor)
