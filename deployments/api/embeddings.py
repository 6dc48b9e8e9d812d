"""The textual inversion embeddings a server serves (``embeddings_dir``), listed in each dialect's
shape: A1111's ``/sdapi/v1/embeddings`` and the native ``/v1/embeddings``.

Listed from the folder on every read (a file copied in is listed, and usable, at once): each
file's header is read, never a pickle. A1111 lists under ``loaded`` the embeddings that fit the
checkpoint it has loaded and under ``skipped`` the others; a server here serves several models,
so ``loaded`` holds every usable file (its ``shape`` tells the family: SD1.5's 768, SDXL's
768 + 1280) and ``skipped`` the files that cannot be used, with why (Raydiance's ``reason``).
"""
from __future__ import annotations

import asyncio
from typing import Any

from pipeline.embedding_library import FAMILY_NAMES, EmbeddingInfo

from deployments.api.generation import ServedModels


def _a1111_entry(info: EmbeddingInfo | None) -> dict[str, Any]:
    """A1111's ``EmbeddingItem``: it knows no training step or checkpoint for a safetensors file."""
    return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
            "shape": info.shape if info else None, "vectors": info.vectors if info else None}


async def a1111_embeddings(models: ServedModels) -> dict[str, dict[str, Any]]:
    """``{"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
    "skipped": {name: {... , "reason"}}}``."""
    loaded, skipped = await asyncio.to_thread(models.embedding_listing)
    return {"loaded": {name: _a1111_entry(info) for name, info in loaded.items()},
            "skipped": {name: {**_a1111_entry(None), "reason": reason}
                        for name, reason in skipped.items()}}


async def native_embeddings(models: ServedModels) -> dict[str, Any]:
    """As ``/v1/loras``, with each embedding's family, vectors and widths, and the skipped files."""
    loaded, skipped = await asyncio.to_thread(models.embedding_listing)
    return {"object": "list",
            "data": [{"id": name, "object": "embedding", "family": info.family,
                      "family_name": FAMILY_NAMES[info.family], "vectors": info.vectors,
                      "shape": info.shape, "widths": list(info.widths)}
                     for name, info in loaded.items()],
            "skipped": [{"id": name, "object": "embedding", "reason": reason}
                        for name, reason in skipped.items()]}
