"""The models a Raydiance app serves: those named in the config plus a checkpoints folder.

The folder is read when asked, not once at deploy: a checkpoint copied into it is servable at
once, with no restart. Metadata (family, native size, VAE scale) comes from config files or
a checkpoint's header, never its weights, and is kept per (path, modification time).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from pipeline.errors import ModelLoadError, NotFoundError
from pipeline.library import CheckpointLibrary
from pipeline.loading import describe_model


class ModelInfo(BaseModel):
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
