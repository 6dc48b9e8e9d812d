"""The original (LDM/SGM) key layout of single-file checkpoints: prefixes, headers, the family.

A checkpoint as ComfyUI and AUTOMATIC1111 users have it is one ``.safetensors`` file whose keys
name each component by the module path of the original training code (``model.diffusion_model.``
the UNet, ``first_stage_model.`` the VAE, ``cond_stage_model.transformer.`` SD1.5's CLIP,
``conditioner.embedders.{0,1}`` SDXL's two text encoders). Everything here reads only the file's
header (key names, shapes, metadata), so it is cheap enough to describe a large file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from pipeline.errors import ModelLoadError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD15 = "cond_stage_model.transformer."
CLIP_SDXL = "conditioner.embedders.0.transformer."
OPEN_CLIP_SDXL = "conditioner.embedders.1.model."
METADATA_KEY = "raydiance.config"
"""Safetensors metadata entry with the settings the weights' shapes cannot tell (norm groups,
attention heads, activation, scheduler, a non-CLIP tokenizer): written by
``tools.checkpoint_writer``, absent from checkpoints made elsewhere, where the bundled SD1.5/SDXL
configs hold."""

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Header:
    """What a checkpoint says about itself without loading a tensor."""

    shapes: Shapes
    metadata: dict[str, str]

    @property
    def settings(self) -> dict[str, Any]:
        """Raydiance's own settings from the metadata ({} for checkpoints made elsewhere)."""
        raw = self.metadata.get(METADATA_KEY)
        if not raw:
            return {}
        try:
            settings = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"metadata {METADATA_KEY!r} is not JSON: {error}") from None
        if not isinstance(settings, dict):
            raise ModelLoadError(f"metadata {METADATA_KEY!r} is not a JSON object")
        return settings


def read_header(path: Path) -> Header:
    """Key shapes and metadata of a ``.safetensors`` file, reading only its header."""
    try:
        with safe_open(path, framework="numpy") as f:  # a header read needs no torch
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise ModelLoadError(f"{path.name}: not a readable safetensors file ({error})") from None
    return Header(shapes, metadata)


def with_prefix(shapes: Shapes, prefix: str) -> Shapes:
    """The entries under ``prefix``, the prefix removed."""
    return {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}


def indices(shapes: Shapes, prefix: str) -> list[int]:
    """The sorted numbers ``N`` of keys that start ``prefix + "N."``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in shapes if (m := pattern.match(key))})


def detect_family(shapes: Shapes) -> str:
    """"sd15" or "sdxl" from the key names; anything else is refused with the reason."""
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    if not has(UNET):
        if any(".lora_" in key or key.startswith("lora_") for key in shapes):
            raise ModelLoadError("this is a LoRA, not a checkpoint: put it in the loras folder")
        raise ModelLoadError(f"no UNet ({UNET}*): not a Stable Diffusion checkpoint")
    if not has(VAE):
        raise ModelLoadError(f"no VAE ({VAE}*): checkpoints without a baked-in VAE are not supported")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError("no UNet input convolution (input_blocks.0.0): not an SD1.5/SDXL UNet")
    if conv_in[1] != 4:
        raise ModelLoadError(f"UNet takes {conv_in[1]} input channels, not 4: inpainting and "
                             "other conditioned UNets are not supported")
    if has(OPEN_CLIP_SDXL) and has(CLIP_SDXL):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ModelLoadError("an SDXL refiner checkpoint: only base models are served")
    if has(CLIP_SD15):
        return "sd15"
    if has("cond_stage_model.model."):
        raise ModelLoadError("an SD2.x checkpoint (OpenCLIP text encoder): only SD1.5 and SDXL are served")
    raise ModelLoadError("no text encoder (cond_stage_model.* or conditioner.embedders.*) found")
