"""What a server can serve, by name: its models (configured ones and a checkpoints folder) and
the LoRAs of a folder, and nothing outside those folders.

A request names a LoRA or a model; the name must resolve to a file inside the configured folder.
A name with a path separator or ``..``, an absolute path, or a symlink that leads out of the
folder is refused (``InvalidRequestError``); an unknown name is ``NotFoundError`` (404).

The checkpoints folder is read when asked, not once at deploy: a checkpoint copied into it is
servable at once, with no restart. Metadata (family, native size, VAE scale) comes from config
files or a checkpoint's header, never its weights, and is kept per (path, modification time).
``ModelCatalog.version`` tells when a model's files were replaced under the same name (the
stages then reload it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InvalidRequestError, ModelLoadError, NotFoundError
from pipeline.model_files import describe_model
from pipeline.pickles import SAFETENSORS, pickle_named, refusal


class _Folder:
    """Name checks and containment shared by the libraries."""

    kind = "file"

    def __init__(self, folder: str | Path, field: str) -> None:
        self.folder = Path(folder).expanduser()
        self.field = field

    def _checked(self, name: object) -> str:
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequestError(self.field, f"a {self.kind} name must be a non-empty string")
        separators = {"/", "\\", os.sep, os.altsep or "/"}
        if (any(s in name for s in separators) or ".." in name or name.startswith(".")
                or os.path.isabs(name) or any(ord(c) < 32 for c in name)):
            raise InvalidRequestError(self.field, f"{name!r} is not a plain {self.kind} name")
        return name.strip()

    def _inside(self, path: Path, name: str) -> Path:
        """``path`` with symlinks resolved, refused if that leaves the folder."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.folder.resolve()):
            raise InvalidRequestError(self.field, f"{name!r} leads outside the {self.kind} folder")
        return resolved

    def _stems(self, suffix: str) -> list[str]:
        if not self.folder.is_dir():
            return []
        root = self.folder.resolve()
        return sorted(p.name[:-len(suffix)] for p in self.folder.iterdir()
                      if p.name.endswith(suffix) and not p.name.startswith(".") and p.is_file()
                      and p.resolve().is_relative_to(root))

    def _safetensors_file(self, stem: str, name: str) -> Path:
        """The folder's ``<stem>.safetensors`` (inside it, a file), else NotFoundError naming
        ``name``; a pickle of that stem is refused as such instead."""
        path = self.folder / f"{stem}{SAFETENSORS}"
        if os.path.lexists(path):
            resolved = self._inside(path, name)
            if resolved.is_file():
                return resolved
        self._refuse_pickle(stem)
        raise NotFoundError(self.field, f"no {self.kind} named {name!r}")

    def _refuse_pickle(self, stem: str) -> None:
        """A name whose only file is a pickle is the caller's mistake (4xx), said as such."""
        path = pickle_named(self.folder, stem)
        if path is not None:
            raise InvalidRequestError(self.field, refusal(path.name))


class LoraLibrary(_Folder):
    """The ``*.safetensors`` LoRAs of one folder, named by file stem."""

    kind = "LoRA"

    def __init__(self, folder: str | Path, field: str = "loras") -> None:
        super().__init__(folder, field)

    def names(self) -> list[str]:
        return self._stems(SAFETENSORS)

    def resolve(self, name: str) -> Path:
        """The LoRA file that ``name`` (with or without ``.safetensors``) stands for."""
        stem = self._checked(name).removesuffix(SAFETENSORS)
        return self._safetensors_file(stem, stem)


class CheckpointLibrary(_Folder):
    """The models of one folder: single ``*.safetensors`` checkpoints (named by stem) and diffusers
    folders (subfolders with a ``model_index.json``, named by folder name; a folder wins over a
    file of the same stem)."""

    kind = "model"

    def __init__(self, folder: str | Path, field: str = "model") -> None:
        super().__init__(folder, field)

    def _folders(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        root = self.folder.resolve()
        return sorted(p.name for p in self.folder.iterdir()
                      if not p.name.startswith(".") and (p / "model_index.json").is_file()
                      and p.resolve().is_relative_to(root))

    def names(self) -> list[str]:
        return sorted(set(self._folders()) | set(self._stems(SAFETENSORS)))

    def resolve(self, name: str) -> Path:
        """The diffusers folder or checkpoint file that ``name`` stands for."""
        name = self._checked(name)
        folder = self.folder / name
        if (folder / "model_index.json").is_file():
            return self._inside(folder, name)
        return self._safetensors_file(name.removesuffix(SAFETENSORS), name)


FileVersion = tuple[tuple[str, int, int, int], ...]
"""(relative path, size, modification time in ns, inode) of each file of a model, sorted."""


def files_version(path: Path) -> FileVersion:
    """What changes when a model's files are replaced under the same name: the size, mtime and
    inode (an atomic rename gives a new one) of the checkpoint file, or of every file of a
    diffusers folder (hidden ones aside). Costs one ``stat`` per file, no read."""
    if not path.is_dir():
        stat = path.stat()
        return (("", stat.st_size, stat.st_mtime_ns, stat.st_ino),)
    files = []
    for root, folders, names in os.walk(path):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in names:
            if not name.startswith("."):
                stat = (Path(root) / name).stat()
                files.append((os.path.relpath(Path(root) / name, path), stat.st_size,
                              stat.st_mtime_ns, stat.st_ino))
    return tuple(sorted(files))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    family: str
    native_size: int
    vae_scale_factor: int


class ModelCatalog:
    """Name -> model path and metadata; configured names win over the folder's."""

    def __init__(self, configured: dict[str, str], checkpoints_dir: str | None = None) -> None:
        self.configured = dict(configured)
        self.checkpoints_dir = checkpoints_dir
        self._library = CheckpointLibrary(checkpoints_dir) if checkpoints_dir else None
        self._described: dict[tuple[str, float], ModelInfo] = {}

    def __getstate__(self) -> dict:  # replicas get the settings, not this process's memo
        return {**self.__dict__, "_described": {}}

    def names(self) -> list[str]:
        folder = self._library.names() if self._library else []
        return list(self.configured) + [n for n in folder if n not in self.configured]

    def path(self, name: str) -> Path:
        """Where model ``name`` lives; NotFoundError (404) naming the served ones otherwise."""
        if name in self.configured:
            return Path(self.configured[name])
        if self._library is not None:
            try:
                return self._library.resolve(name)
            except NotFoundError:
                pass
        raise NotFoundError("model", f"unknown model {name!r}; served: {', '.join(self.names())}")

    def describe(self, name: str) -> ModelInfo:
        path = self.path(name)
        key = (str(path), path.stat().st_mtime)
        if key not in self._described:
            try:
                description = describe_model(path)
            except ModelLoadError as error:
                raise ModelLoadError(f"model {name!r}: {error}") from error
            self._described[key] = ModelInfo(
                name=name, path=str(path), family=description.family,
                native_size=description.native_size, vae_scale_factor=description.vae_scale_factor)
        return self._described[key]

    def version(self, name: str) -> FileVersion:
        """The version of model ``name``'s files on disk (blocking: a ``stat`` per file)."""
        return files_version(self.path(name))

    def describe_all(self) -> list[ModelInfo]:
        """Every servable model; a broken file in the folder is left out rather than failing all."""
        infos = []
        for name in self.names():
            try:
                infos.append(self.describe(name))
            except ModelLoadError:
                if name in self.configured:
                    raise
        return infos
