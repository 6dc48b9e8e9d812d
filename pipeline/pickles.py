"""Pickle-format weights are refused unread: unpickling a file can run any code it carries.

The one place that knows which files are pickles and what a refusal says; model loading, the
checkpoint and LoRA folders all ask here.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import UnsafeWeightsError

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def refusal(name: str) -> str:
    """What a refusal of pickle file ``name`` says, and how to fix it."""
    return (f"{name}: pickle-format weights are refused (they can run code when loaded); "
            "convert it to .safetensors")


def pickle_named(folder: Path, stem: str) -> Path | None:
    """A pickle-format file called ``stem`` in ``folder`` (the file a user meant when the
    ``.safetensors`` of that name is missing), or None."""
    return next((path for suffix in sorted(PICKLE_SUFFIXES)
                 if (path := folder / f"{stem}{suffix}").exists()), None)


def refuse_pickles(path: Path) -> None:
    """Raise if ``path`` is, or a component folder of it holds only, pickle-format weights."""
    if path.is_file():
        if is_pickle(path):
            raise UnsafeWeightsError(refusal(path.name))
        return
    for component in [p for p in path.iterdir() if p.is_dir()]:
        weights = [f for f in component.iterdir() if is_pickle(f) or f.suffix.lower() == SAFETENSORS]
        if weights and all(is_pickle(f) for f in weights):
            raise UnsafeWeightsError(refusal(f"{component.name}/{weights[0].name}"))
