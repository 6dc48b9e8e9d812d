"""Pickle-format weights are refused unread: unpickling a file can run any code it carries."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import UnsafeWeightsError

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})


def refuse_pickles(path: Path) -> None:
    """Raise if ``path`` is, or a component folder of it holds only, pickle-format weights."""
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
