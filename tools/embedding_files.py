"""Textual inversion embedding files in AUTOMATIC1111's formats, written for tests and demos:
SD1.5 ``emb_params`` (n x width), SDXL ``clip_l`` and ``clip_g``; and a pickle that must never
be opened (unpickling it creates a marker file)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file


def random_vectors(model, vectors: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """``vectors`` random rows per text encoder of ``model``, at its token embeddings' scale."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for encoder in model.text_encoders:
        weight = encoder.get_input_embeddings().weight.detach().float()
        rows.append(torch.randn(vectors, weight.shape[1], generator=generator) * weight.std() * scale)
    return tuple(rows)


def write_embedding(path: Path, vectors: tuple[torch.Tensor, ...] | torch.Tensor) -> Path:
    """One tensor (SD1.5: ``emb_params``) or two (SDXL: ``clip_l``, ``clip_g``) as A1111 saves them."""
    vectors = (vectors,) if isinstance(vectors, torch.Tensor) else tuple(vectors)
    keys = ("emb_params",) if len(vectors) == 1 else ("clip_l", "clip_g")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: v.contiguous().to(torch.float32) for key, v in zip(keys, vectors, strict=True)},
              str(path))
    return path


class _Tripwire:
    """Unpickling this opens ``marker`` for writing, which creates it: proof that it was read."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_tripwire_pickle(path: Path, marker: Path) -> Path:
    """A ``.pt``-style pickle that leaves ``marker`` behind if anything ever unpickles it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"string_to_param": {"*": _Tripwire(marker)}}))
    return path
