"""Textual inversion embeddings, as AUTOMATIC1111 serves them: a folder of ``*.safetensors`` files,
each named by its stem, used by writing that name in a prompt or negative prompt.

A1111's formats: an SD1.5 file holds ``emb_params`` (``n_vectors x 768``; diffusers' own
single-tensor files are taken too), an SDXL file ``clip_l`` (``n x 768``) and ``clip_g``
(``n x 1280``), one tensor per text encoder. A prompt word equal to an embedding's name (case
aside, as CLIP lowercases: A1111 matches tokens) stands for its ``n`` vectors. Pickle-format
files (``.pt``, ``.bin``) are never read: listed as skipped, refused when a prompt names one.

``EmbeddingLibrary`` is what a server can list and what a prompt's words resolve to (a name never
leaves the folder, as ``LoraLibrary``); ``find_embeddings`` the matching of prompt words;
``LoadedEmbeddings`` a stage's reader, keeping each file's vectors while its version holds. How
the vectors reach the text encoders is ``pipeline.prompt_tokens``.
"""
from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from cachetools import LRUCache
from safetensors import safe_open

from pipeline.errors import InvalidRequestError
from pipeline.library import FileVersion, _Folder, files_version
from pipeline.model import DiffusionModel, Family
from pipeline.pickles import PICKLE_SUFFIXES, SAFETENSORS, refusal

PromptEmbeddings = tuple[tuple[str, FileVersion], ...]
"""The embeddings a request's prompts name, with the version of each file, sorted by name: part
of the TextEncoder's cache key, so that a file replaced under the same name is not served stale."""
MAX_VECTORS = 75  # a prompt's room in CLIP's 77 tokens, BOS and EOS aside
MAX_EMBEDDINGS_PER_REQUEST = 32
_SDXL_KEYS = ("clip_l", "clip_g")
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


def _unusable(path: Path, field: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(field, f"embedding {path.name}: {why}")


def _layout(shapes: Mapping[str, list[int]], path: Path, field: str) -> tuple[Family, tuple[str, ...]]:
    """Which tensors hold the vectors, per text encoder, and the family that makes it."""
    if all(key in shapes for key in _SDXL_KEYS):
        return "sdxl", _SDXL_KEYS
    if _SD15_KEY in shapes:
        return "sd15", (_SD15_KEY,)
    if len(shapes) == 1:  # diffusers' learned_embeds: {token: vectors}
        return "sd15", tuple(shapes)
    raise _unusable(path, field, "not a textual inversion embedding (A1111's files hold "
                    "emb_params, or clip_l and clip_g)")


def _rows(shape: list[int], key: str, path: Path, field: str) -> tuple[int, int]:
    """(vectors, width) of a ``(width,)`` or ``(n, width)`` tensor."""
    if len(shape) not in (1, 2) or 0 in shape:
        raise _unusable(path, field, f"{key} has shape {tuple(shape)}; expected (vectors, width)")
    vectors = 1 if len(shape) == 1 else shape[0]
    if vectors > MAX_VECTORS:
        raise _unusable(path, field, f"{vectors} vectors; a prompt holds at most {MAX_VECTORS}")
    return vectors, shape[-1]


def describe_embedding(path: Path, name: str, field: str = "prompt") -> EmbeddingInfo:
    """The embedding's family, vectors and widths from the file's header; no tensor is read."""
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # safetensors' own error types
        raise _unusable(path, field, f"not a readable safetensors file ({str(error)[:200]})") from None
    family, keys = _layout(shapes, path, field)
    rows = [_rows(shapes[key], key, path, field) for key in keys]
    if len({vectors for vectors, _ in rows}) != 1:
        raise _unusable(path, field, "clip_l and clip_g hold different numbers of vectors")
    return EmbeddingInfo(name, family, rows[0][0], tuple(width for _, width in rows))


def read_embedding(path: Path, name: str, version: FileVersion = (),
                   field: str = "prompt") -> TextEmbedding:
    """The embedding's vectors, float32; refused (naming ``field``) if the file is not one."""
    if path.suffix.lower() != SAFETENSORS:
        raise InvalidRequestError(field, refusal(path.name))
    info = describe_embedding(path, name, field)
    keys = _SDXL_KEYS if info.family == "sdxl" else None
    with safe_open(path, framework="pt") as f:
        tensors = [f.get_tensor(key) for key in (keys or tuple(f.keys()))]
    vectors = tuple(t.reshape(info.vectors, -1).to(torch.float32).contiguous() for t in tensors)
    if not all(torch.isfinite(v).all() for v in vectors):
        raise _unusable(path, field, "holds NaN or infinite values")
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
