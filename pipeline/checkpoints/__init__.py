"""Single-file checkpoints: one ``.safetensors`` in the original LDM/SGM layout, as users have them.

SD1.5 and SDXL (so Pony, Illustrious and the other SDXL fine-tunes) load offline, component by
component, into a ``DiffusionModel`` (``tools.checkpoint_writer`` writes them, for tests). Pickle formats
are refused unread.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.checkpoints.layout import METADATA_KEY
from pipeline.checkpoints.load import load_checkpoint, read_configs
from pipeline.model import ModelDescription

__all__ = ["METADATA_KEY", "describe_checkpoint", "load_checkpoint"]


def describe_checkpoint(path: str | Path) -> ModelDescription:
    """Family, native size and VAE scale from the file's header alone."""
    return read_configs(Path(path))[1].description
