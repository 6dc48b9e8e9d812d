"""A diffusers folder's JSON files: which pipeline it is, and its UNet, VAE and scheduler configs.

Read apart from the weights (``pipeline.diffusers_folder``), with no torch or diffusers import:
the API process describes models through this, and every stage reads it before its weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError
from pipeline.model_configs import Family, ModelConfigs
from pipeline.preview import read_latent_rgb

_FAMILY_BY_PIPELINE: dict[str, Family] = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
}


def read_configs(path: Path) -> ModelConfigs:
    """The folder's family and UNet, VAE and scheduler configs, from its JSON files."""
    return read_index(path)[1]


def read_index(path: Path) -> tuple[dict[str, Any], ModelConfigs]:
    """``model_index.json`` (which names the text encoders' classes) and the configs."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    family = _FAMILY_BY_PIPELINE.get(index.get("_class_name", ""))
    if family is None:
        raise ModelLoadError(f"{path}: pipeline {index.get('_class_name')!r} is not SD1.5 or SDXL")

    def read(relative: str) -> dict[str, Any]:
        file = path / relative
        if not file.is_file():
            raise ModelLoadError(f"{path.name}: incomplete {family} folder (no {relative})")
        return json.loads(file.read_text())

    return index, ModelConfigs.with_index(family, index, unet=read("unet/config.json"),
                                          vae=read("vae/config.json"),
                                          scheduler=read("scheduler/scheduler_config.json"),
                                          latent_rgb=read_latent_rgb(path))
