"""Single-file checkpoints: one ``.safetensors`` in the original LDM/SGM layout, as users have them.

SD1.5 and SDXL (so Pony, Illustrious and the other SDXL fine-tunes) load offline into a
``DiffusionModel``; ``save_checkpoint`` writes one. Pickle formats are refused unread.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.checkpoints.layout import (
    METADATA_KEY,
    VAE,
    detect_family,
    indices,
    read_header,
    with_prefix,
)
from pipeline.checkpoints.load import load_checkpoint
from pipeline.checkpoints.save import save_checkpoint
from pipeline.configs import bundled_config
from pipeline.model import ModelDescription

__all__ = ["METADATA_KEY", "describe_checkpoint", "load_checkpoint", "save_checkpoint"]


def describe_checkpoint(path: str | Path) -> ModelDescription:
    """Family, native size and VAE scale from the file's header alone."""
    header = read_header(Path(path))
    family = detect_family(header.shapes)
    factor = 2 ** (len(indices(with_prefix(header.shapes, VAE), "encoder.down.")) - 1)
    unet = {**bundled_config(family, "unet"), **header.settings.get("unet", {})}
    return ModelDescription(family, int(unet["sample_size"]) * factor, factor)  # type: ignore[arg-type]
