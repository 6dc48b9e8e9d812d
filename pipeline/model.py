"""Loading a Stable Diffusion-family model, a diffusers folder or a single-file checkpoint.

Local files only, safetensors only. Single ``.safetensors`` checkpoints in the original LDM/SGM
layout (as ComfyUI and AUTOMATIC1111 users have them) load through ``pipeline.checkpoints``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.errors import ModelLoadError, UnsafeWeightsError

Family = Literal["sd15", "sdxl"]
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
_FAMILY_BY_PIPELINE = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
}
_TEXT_ENCODER_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


@dataclass
class DiffusionModel:
    """The components of one model, on one device, ready for the stages to use."""

    name: str
    family: Family
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[torch.nn.Module]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool = False
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side in pixels the model was trained at (64 tiny-shapes, 512 SD1.5, 1024 SDXL)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)


def refuse_pickles(path: Path) -> None:
    """Raise if ``path`` is, or a component folder holds only, pickle-format weights."""
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeWeightsError(
                f"{path.name}: pickle-format weights are refused (they can run code when loaded); "
                "convert the checkpoint to .safetensors")
        return
    for component in [p for p in path.iterdir() if p.is_dir()]:
        files = list(component.iterdir())
        weights = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}]
        if weights and not any(f.suffix == ".safetensors" for f in weights):
            raise UnsafeWeightsError(
                f"{component.name}/{weights[0].name}: pickle-format weights are refused (they can "
                "run code when loaded); save the model with safe_serialization=True")


def vae_dtype(vae_config: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in fp16 (its config says ``force_upcast``): decode in fp32."""
    if dtype == torch.float16 and vae_config.get("force_upcast", True):
        return torch.float32
    return dtype


@dataclass(frozen=True)
class ModelDescription:
    """What a catalog needs to know of a model without loading its weights."""

    family: Family
    native_size: int  # the side in pixels the model was trained at
    vae_scale_factor: int


def describe_model(path: str | Path) -> ModelDescription:
    """Family, native size and VAE scale of a diffusers folder (its JSON files) or a single-file
    checkpoint (its header: key names, shapes and metadata), reading no weights."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model")
    refuse_pickles(path)
    if path.is_file():
        # imported here: that package imports this module
        from pipeline.checkpoints import describe_checkpoint

        return describe_checkpoint(path)
    index = _read_index(path)
    family = _FAMILY_BY_PIPELINE.get(index.get("_class_name", ""))
    if family is None:
        raise ModelLoadError(f"{path}: pipeline {index.get('_class_name')!r} is not SD1.5 or SDXL")
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    vae_config = json.loads((path / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return ModelDescription(family, int(unet_config["sample_size"]) * factor, factor)


def _read_index(path: Path) -> dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
    return json.loads(index_file.read_text())


def load_model(path: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, name: str | None = None) -> DiffusionModel:
    """Load an SD1.5 or SDXL diffusers folder or single ``.safetensors`` checkpoint; never
    reaches the network, never unpickles."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model")
    refuse_pickles(path)
    if path.is_file():
        # imported here: that package imports this module
        from pipeline.checkpoints import load_checkpoint

        return load_checkpoint(path, device=device, dtype=dtype, name=name)
    index = _read_index(path)
    family = _FAMILY_BY_PIPELINE.get(index.get("_class_name", ""))
    if family is None:
        raise ModelLoadError(f"{path}: pipeline {index.get('_class_name')!r} is not SD1.5 or SDXL")
    encoder_names = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    tokenizers, encoders = [], []
    for i, encoder_name in enumerate(encoder_names):
        tokenizer_name = "tokenizer" if i == 0 else "tokenizer_2"
        tokenizers.append(CLIPTokenizer.from_pretrained(path / tokenizer_name, local_files_only=True))
        encoder_class = _TEXT_ENCODER_CLASSES[index[encoder_name][1]]
        encoders.append(encoder_class.from_pretrained(
            path / encoder_name, local_files_only=True, use_safetensors=True, dtype=dtype,
        ).to(device).eval().requires_grad_(False))
    unet = UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", local_files_only=True, use_safetensors=True, torch_dtype=dtype,
    ).to(device).eval().requires_grad_(False)
    vae_config = json.loads((path / "vae" / "config.json").read_text())
    vae = AutoencoderKL.from_pretrained(
        path, subfolder="vae", local_files_only=True, use_safetensors=True,
        torch_dtype=vae_dtype(vae_config, dtype),
    ).to(device).eval().requires_grad_(False)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return DiffusionModel(
        name=name or path.name, family=family, tokenizers=tokenizers, text_encoders=encoders,
        unet=unet, vae=vae, scheduler_config=scheduler_config,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")),
        path=path,
    )
