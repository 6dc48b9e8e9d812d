"""Diffusers model folders (``save_pretrained``'s layout): only the asked components' subfolders are read.

The JSON files (``model_index.json``, ``unet/config.json``, ``vae/config.json``, the scheduler's)
are read always: every stage needs some of them and they cost nothing. Weights load from the
component folders a stage asks for, through the component classes' own ``from_pretrained``,
local files and safetensors only.
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.device import for_inference, vae_dtype
from pipeline.folder_configs import read_index
from pipeline.model import DiffusionModel, TextEncoders
from pipeline.model_configs import COMPONENTS, Component, Family, text_encoder_parts

_TEXT_ENCODER_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def load_folder(path: Path, *, components: Collection[Component] = COMPONENTS,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                name: str | None = None) -> DiffusionModel:
    """Load ``components`` of an SD1.5 or SDXL diffusers folder."""
    index, configs = read_index(path)
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
