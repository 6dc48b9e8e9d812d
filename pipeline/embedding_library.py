"""Textual inversion embeddings as a server lists and names them: a folder of ``*.safetensors``
files, each named by its stem, and the words of a prompt that name them.

Only headers are read here (family, vectors, widths) and no torch is imported: the API process
lists embeddings and resolves a request's prompts through this; a stage reads the vectors
(``pipeline.embeddings``).
"""
from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from pipeline.errors import InvalidRequestError
from pipeline.library import FileVersion, _Folder, files_version
from pipeline.model_configs import Family
from pipeline.pickles import PICKLE_SUFFIXES, SAFETENSORS, refusal

PromptEmbeddings = tuple[tuple[str, FileVersion], ...]
"""The embeddings a request's prompts name, with the version of each file, sorted by name: part
of the TextEncoder's cache key, so that a file replaced under the same name is not served stale."""
MAX_VECTORS = 75  # a prompt's room in CLIP's 77 tokens, BOS and EOS aside
MAX_EMBEDDINGS_PER_REQUEST = 32
SDXL_KEYS = ("clip_l", "clip_g")
_SD15_KEY = "emb_params"
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


@dataclass(frozen=True)
class EmbeddingInfo:
    """What a file's header says: the family it is for, its vectors and their widths (one per
    text encoder); ``shape`` is A1111's (the widths summed)."""

    name: str
    family: Family
    vectors: int
    widths: tuple[int, ...]

    @property
    def shape(self) -> int:
        return sum(self.widths)


def unusable(path: Path, field: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(field, f"embedding {path.name}: {why}")


def _layout(shapes: Mapping[str, list[int]], path: Path, field: str) -> tuple[Family, tuple[str, ...]]:
    """Which tensors hold the vectors, per text encoder, and the family that makes it."""
    if all(key in shapes for key in SDXL_KEYS):
        return "sdxl", SDXL_KEYS
    if _SD15_KEY in shapes:
        return "sd15", (_SD15_KEY,)
    if len(shapes) == 1:  # diffusers' learned_embeds: {token: vectors}
        return "sd15", tuple(shapes)
    raise unusable(path, field, "not a textual inversion embedding (A1111's files hold "
                    "emb_params, or clip_l and clip_g)")


def _rows(shape: list[int], key: str, path: Path, field: str) -> tuple[int, int]:
    """(vectors, width) of a ``(width,)`` or ``(n, width)`` tensor."""
    if len(shape) not in (1, 2) or 0 in shape:
        raise unusable(path, field, f"{key} has shape {tuple(shape)}; expected (vectors, width)")
    vectors = 1 if len(shape) == 1 else shape[0]
    if vectors > MAX_VECTORS:
        raise unusable(path, field, f"{vectors} vectors; a prompt holds at most {MAX_VECTORS}")
    return vectors, shape[-1]


def describe_embedding(path: Path, name: str, field: str = "prompt") -> EmbeddingInfo:
    """The embedding's family, vectors and widths from the file's header; no tensor is read."""
    try:
        with safe_open(path, framework="numpy") as f:  # a header read needs no torch
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # safetensors' own error types
        raise unusable(path, field, f"not a readable safetensors file ({str(error)[:200]})") from None
    family, keys = _layout(shapes, path, field)
    rows = [_rows(shapes[key], key, path, field) for key in keys]
    if len({vectors for vectors, _ in rows}) != 1:
        raise unusable(path, field, "clip_l and clip_g hold different numbers of vectors")
    return EmbeddingInfo(name, family, rows[0][0], tuple(width for _, width in rows))


@functools.lru_cache(maxsize=64)
def _matcher(names: tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """A pattern of the names as whole words (longest first), and lowercase -> name."""
    ordered = sorted(names, key=lambda n: (-len(n), n))
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, ordered)) + r")(?!\w)",
                         re.IGNORECASE)
    canonical: dict[str, str] = {}
    for name in sorted(names):
        canonical.setdefault(name.lower(), name)
    return pattern, canonical


def embedding_spans(text: str | None, names: Iterable[str]) -> list[tuple[int, int, str]]:
    """(start, end, name) of each word of ``text`` that names one of ``names``: the whole word,
    bounded by anything but a letter, digit or ``_`` (so ``(name:1.2)`` and ``name,`` match),
    case aside (an exact name wins over another differing in case only)."""
    known = tuple(sorted(set(names)))
    if not text or not known:
        return []
    pattern, canonical = _matcher(known)
    spans = []
    for match in pattern.finditer(text):
        word = match.group()
        name = word if word in known else canonical.get(word.lower())
        if name is not None:
            spans.append((match.start(), match.end(), name))
    return spans


def find_embeddings(text: str | None, names: Iterable[str]) -> list[str]:
    """The names of ``names`` that ``text`` uses, each once, in order of first use."""
    return list(dict.fromkeys(name for _, _, name in embedding_spans(text, names)))


def embedding_field(name: str, prompt: str, negative_prompt: str | None) -> str:
    """Where a request uses embedding ``name``: ``prompt``, else ``negative_prompt``."""
    return "prompt" if embedding_spans(prompt, (name,)) or not negative_prompt else "negative_prompt"


class EmbeddingLibrary(_Folder):
    """The ``*.safetensors`` embeddings of one folder, named by file stem; the folder's pickles
    are listed as skipped and never opened."""

    kind = "embedding"

    def __init__(self, folder: str | Path, field: str = "prompt") -> None:
        super().__init__(folder, field)
        self._described: dict[tuple[str, FileVersion], EmbeddingInfo] = {}
        self._lock = threading.Lock()  # listings run in threads

    def names(self) -> list[str]:
        """Every name a prompt may use: the safetensors files' stems that are plain names."""
        return [stem for stem in self._stems(SAFETENSORS) if self._plain(stem)]

    def _plain(self, stem: str) -> bool:
        try:
            return self._checked(stem) == stem
        except InvalidRequestError:
            return False

    def pickles(self) -> list[Path]:
        """The folder's pickle-format files, by name only: never opened."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES
                      and not p.name.startswith(".") and p.is_file())

    def resolve(self, name: str, field: str | None = None) -> Path:
        """The file that embedding ``name`` stands for; refused naming ``field`` (the library's
        by default) for a name with a path in it, one that leads out of the folder, or a pickle."""
        try:
            stem = self._checked(name).removesuffix(SAFETENSORS)
            return self._safetensors_file(stem, stem)
        except InvalidRequestError as error:
            if field is None or field == error.field:
                raise
            raise type(error)(field, error.message) from None

    def describe(self, name: str) -> EmbeddingInfo:
        """An embedding's header, kept per file version (a replaced file is read again)."""
        path = self.resolve(name)
        key = (str(path), files_version(path))
        with self._lock:
            info = self._described.get(key)
        if info is None:
            info = describe_embedding(path, name, self.field)
            with self._lock:
                if len(self._described) > 1024:
                    self._described.clear()
                self._described[key] = info
        return info

    def listing(self) -> tuple[dict[str, EmbeddingInfo], dict[str, str]]:
        """(usable embeddings by name, skipped files by name with the reason): pickles unread,
        unreadable or malformed files with what is wrong with them."""
        loaded: dict[str, EmbeddingInfo] = {}
        skipped: dict[str, str] = {}
        for name in self.names():
            try:
                loaded[name] = self.describe(name)
            except (InvalidRequestError, OSError) as error:
                skipped[name] = getattr(error, "message", str(error))
        for path in self.pickles():
            key = path.stem if path.stem not in loaded and path.stem not in skipped else path.name
            skipped[key] = refusal(path.name)
        return loaded, skipped

    def lookup(self, prompt: str, negative_prompt: str | None) -> PromptEmbeddings:
        """The embeddings a request's prompts name, with their files' versions. A word naming a
        pickle-format file is refused (4xx naming the prompt it is in), never read."""
        usable = self.names()
        names = usable + [p.stem for p in self.pickles() if p.stem not in usable and self._plain(p.stem)]
        found: dict[str, FileVersion] = {}
        for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            for name in find_embeddings(text, names):
                if name not in found:
                    found[name] = files_version(self.resolve(name, field))
                if len(found) > MAX_EMBEDDINGS_PER_REQUEST:
                    raise InvalidRequestError(field, f"more than {MAX_EMBEDDINGS_PER_REQUEST} "
                                              "embeddings in one request")
        return tuple(sorted(found.items()))
