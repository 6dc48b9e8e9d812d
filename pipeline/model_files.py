"""A model's files on disk: that they exist and are no pickle, and what they hold, from metadata.

Separate from loading (``pipeline.loading``) so that describing a model imports neither torch nor
diffusers: the API process and the app builder describe every model, and load none.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.checkpoints.describe import describe_checkpoint
from pipeline.errors import ModelLoadError
from pipeline.folder_configs import read_configs
from pipeline.model_configs import ModelDescription
from pipeline.pickles import refuse_pickles


def existing_model(path: str | Path) -> Path:
    """The model's absolute path; ModelLoadError if it is missing or a pickle format."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model")
    refuse_pickles(path)
    return path


def describe_model(path: str | Path) -> ModelDescription:
    """Family, native size and VAE scale of a diffusers folder (its JSON files) or a single-file
    checkpoint (its header: key names, shapes and metadata), reading no weights."""
    path = existing_model(path)
    if path.is_file():
        return describe_checkpoint(path)
    return read_configs(path).description
