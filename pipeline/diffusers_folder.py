"""Diffusers model folders (``save_pretrained``'s layout): only the asked components' subfolders are read.

The JSON files (``model_index.json``, ``unet/config.json``, ``vae/config.json``, the scheduler's)
are read always: every stage needs some of them and they cost nothing. Weights load from the
component folders a stage asks for, through the component classes' own ``from_pretrained``,
local files and safetensors only.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.device import for_inference, vae_dtype
from pipeline.errors import ModelLoadError
from pipeline.preview import read_latent_rgb
from pipeline.model import (COMPONENTS, Component, DiffusionModel, Family, ModelConfigs, TextEncoders,
                            text_encoder_parts)

_FAMILY_BY_PIPELINE: dict[str, Family] = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
}
_TEXT_ENCODER_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def read_configs(path: Path) -> ModelConfigs:
    """The folder's family and UNet, VAE and scheduler configs, from its JSON files."""
    return _read(path)[1]


def _read(path: Path) -> tuple[dict[str, Any], ModelConfigs]:
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


def load_folder(path: Path, *, components: Collection[Component] = COMPONENTS,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                name: str | None = None) -> DiffusionModel:
    """Load ``components`` of an SD1.5 or SDXL diffusers folder."""
    index, configs = _read(path)
    loaded: dict[Component, Any] = {}
    if "text_encoders" in components:
        loaded["text_encoders"] = _text_encoders(path, index, configs.family, device, dtype)
    if "unet" in components:
        loaded["unet"] = for_inference(UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", local_files_only=True, use_safetensors=True, torch_dtype=dtype), device)
    if "vae" in components:
        loaded["vae"] = for_inference(AutoencoderKL.from_pretrained(
            path, subfolder="vae", local_files_only=True, use_safetensors=True,
            torch_dtype=vae_dtype(configs.vae, dtype)), device)
    return DiffusionModel(name or path.name, configs, loaded)


def _text_encoders(path: Path, index: dict[str, Any], family: Family, device: torch.device | str,
                   dtype: torch.dtype) -> TextEncoders:
    tokenizers, encoders = [], []
    for tokenizer_name, encoder_name in text_encoder_parts(family):
        tokenizers.append(CLIPTokenizer.from_pretrained(path / tokenizer_name, local_files_only=True))
        encoder_class = _TEXT_ENCODER_CLASSES[index[encoder_name][1]]
        encoders.append(for_inference(encoder_class.from_pretrained(
            path / encoder_name, local_files_only=True, use_safetensors=True, dtype=dtype), device))
    return TextEncoders(tokenizers, encoders)
