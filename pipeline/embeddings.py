"""Textual inversion embeddings, as AUTOMATIC1111 serves them, read for a text encoder.

A1111's formats: an SD1.5 file holds ``emb_params`` (``n_vectors x 768``; diffusers' own
single-tensor files are taken too), an SDXL file ``clip_l`` (``n x 768``) and ``clip_g``
(``n x 1280``), one tensor per text encoder. A prompt word equal to an embedding's name (case
aside, as CLIP lowercases: A1111 matches tokens) stands for its ``n`` vectors. Pickle-format
files (``.pt``, ``.bin``) are never read: listed as skipped, refused when a prompt names one.

What a server lists and how a prompt's words resolve to files is
``pipeline.embedding_library`` (no torch); here ``LoadedEmbeddings`` is a stage's reader,
keeping each file's vectors while its version holds. How the vectors reach the text encoders is
``pipeline.prompt_tokens``.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from cachetools import LRUCache
from safetensors import safe_open

from pipeline.embedding_library import (FAMILY_NAMES, SDXL_KEYS, EmbeddingLibrary, PromptEmbeddings,
                                        describe_embedding, embedding_field, unusable)
from pipeline.errors import InvalidRequestError
from pipeline.library import FileVersion, files_version
from pipeline.model import DiffusionModel
from pipeline.model_configs import Family
from pipeline.pickles import SAFETENSORS, refusal


@dataclass(frozen=True, eq=False)
class TextEmbedding:
    """One embedding's vectors, ``(n, width)`` float32 per text encoder (SD1.5 one, SDXL
    ``clip_l`` then ``clip_g``), and the version of the file they were read from."""

    name: str
    vectors: tuple[torch.Tensor, ...]
    version: FileVersion = ()

    @property
    def family(self) -> Family:
        return "sdxl" if len(self.vectors) == 2 else "sd15"

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(v.shape[-1]) for v in self.vectors)

    def __len__(self) -> int:  # vectors per encoder: the tokens it takes in a prompt
        return int(self.vectors[0].shape[0])


def read_embedding(path: Path, name: str, version: FileVersion = (),
                   field: str = "prompt") -> TextEmbedding:
    """The embedding's vectors, float32; refused (naming ``field``) if the file is not one."""
    if path.suffix.lower() != SAFETENSORS:
        raise InvalidRequestError(field, refusal(path.name))
    info = describe_embedding(path, name, field)
    keys = SDXL_KEYS if info.family == "sdxl" else None
    with safe_open(path, framework="pt") as f:
        tensors = [f.get_tensor(key) for key in (keys or tuple(f.keys()))]
    vectors = tuple(t.reshape(info.vectors, -1).to(torch.float32).contiguous() for t in tensors)
    if not all(torch.isfinite(v).all() for v in vectors):
        raise unusable(path, field, "holds NaN or infinite values")
    return TextEmbedding(name, vectors, version)


def check_fits(embedding: TextEmbedding, model: DiffusionModel, field: str) -> None:
    """Refuses (naming ``field``) an embedding made for other text encoders than the model's."""
    widths = tuple(e.get_input_embeddings().embedding_dim for e in model.text_encoders)
    if embedding.widths == widths:
        return
    made = f"{FAMILY_NAMES[embedding.family]} embedding ({' + '.join(map(str, embedding.widths))} wide)"
    takes = " + ".join(map(str, widths))
    raise InvalidRequestError(field, f"{embedding.name!r} is an {made}; model {model.name!r} "
                              f"({FAMILY_NAMES[model.family]}) takes {takes}")


class LoadedEmbeddings:
    """A stage's embeddings, read from its library and kept by name while the file's version
    holds (a replaced file is read again). Thread-safe: requests read files in threads."""

    def __init__(self, library: EmbeddingLibrary, capacity: int = 64) -> None:
        self.library = library
        self._kept: LRUCache[str, TextEmbedding] = LRUCache(maxsize=capacity)
        self._lock = threading.Lock()

    def read(self, requested: PromptEmbeddings, prompt: str,
             negative_prompt: str | None) -> dict[str, TextEmbedding]:
        """The embeddings ``requested`` names, as their files are now (blocking: a ``stat`` per
        file, a read for each new or replaced one); refusals name the prompt that uses them."""
        result: dict[str, TextEmbedding] = {}
        for name, _ in requested:
            field = embedding_field(name, prompt, negative_prompt)
            path = self.library.resolve(name, field)
            version = files_version(path)
            with self._lock:
                kept = self._kept.get(name)
            if kept is None or kept.version != version:
                kept = read_embedding(path, name, version, field)
                with self._lock:
                    self._kept[name] = kept
            result[name] = kept
        return result


def versions(embeddings: Mapping[str, TextEmbedding]) -> PromptEmbeddings:
    """The cache-key form of embeddings read: (name, file version), sorted."""
    return tuple(sorted((name, e.version) for name, e in embeddings.items()))
