"""A stage replica's models: only the components its stage runs, loaded on first use off the
event loop through Ray Serve's model multiplexing, reloaded when their files change on disk,
with their LoRA adapters kept beside them; and the report of what it holds."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

from ray import serve

from pipeline.device import default_dtype, select_device
from pipeline.errors import InvalidRequestError
from pipeline.library import FileVersion, LoraLibrary
from pipeline.loading import load_model
from pipeline.lora import AdapterManager
from pipeline.lora_set import LoraSet
from pipeline.memory import component_bytes, process_memory
from pipeline.model import DiffusionModel
from pipeline.model_configs import Component

from deployments import metrics
from deployments.metrics import LoadTimer
from deployments.settings import StageSettings
from deployments.torch_worker import TorchWorker

logger = logging.getLogger("ray.serve")


class HeldModels:
    """The models alive in this replica: loaded and not yet garbage (a model the multiplexer
    dropped stays alive, and in memory, while requests still use it). Publishes
    ``raydiance_replica_model_bytes`` by model and component whenever that set changes."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[DiffusionModel] = weakref.WeakSet()
        self._published: set[tuple[str, str]] = set()

    def add(self, model: DiffusionModel) -> None:
        self._live.add(model)
        weakref.finalize(model, self.publish)
        self.publish()

    def models(self) -> list[DiffusionModel]:
        return list(self._live)

    def bytes_by_model(self) -> dict[str, dict[str, int]]:
        """{model name: {component: tensor bytes}}, two live copies of one model added up."""
        held: dict[str, Counter[str]] = {}
        for model in self.models():
            held.setdefault(model.name, Counter()).update(component_bytes(model))
        return {name: dict(components) for name, components in sorted(held.items())}

    def publish(self) -> None:
        current = {(name, component): size for name, components in self.bytes_by_model().items()
                   for component, size in components.items()}
        for name, component in self._published - set(current):  # gone: the series drops to 0
            metrics.set_gauge("raydiance_replica_model_bytes", 0, model=name, component=component)
        for (name, component), size in current.items():
            metrics.set_gauge("raydiance_replica_model_bytes", size, model=name, component=component)
        self._published = set(current)


class ModelSlot:
    """One served name in this replica: its model and the version of the files it came from.

    Serve's multiplexer keeps slots by name (the model id every request carries); a slot whose
    files changed on disk loads the new ones in place, so the router's view (this replica holds
    the name) stays true across a replacement.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.model: DiffusionModel | None = None
        self.version: FileVersion | None = None
        self.lock = asyncio.Lock()  # one load at a time; the others wait for it


class ModelStore:
    """This replica's models: the ``components`` its stage runs and nothing else, loaded on first
    use off the event loop, at most ``max_models_per_replica`` kept (Ray Serve model
    multiplexing, which also tells the router which replica holds which model), the default one
    loaded by ``start``.

    ``await store.get(name)`` returns the model, reloaded first if its files were replaced on
    disk under the same name since it was loaded (their size, mtime and inode, read in a thread:
    ``ModelCatalog.version``). A model dropped from the store stays alive for the requests still
    using it. Each model's LoRA adapters are kept beside it, keyed weakly, so they go when it goes.
    """

    def __init__(self, settings: StageSettings, worker: TorchWorker,
                 components: tuple[Component, ...],
                 prepare: Callable[[DiffusionModel], None] | None = None) -> None:
        self.settings = settings
        self.prepare = prepare  # on the worker thread after each load (the Denoiser compiles)
        self.catalog = settings.catalog()
        self.worker = worker
        self.components = components
        self.device = select_device(settings.accelerator)
        self.dtype = default_dtype(self.device)
        self.held = HeldModels()
        self._lora_managers: weakref.WeakKeyDictionary[DiffusionModel, AdapterManager] = (
            weakref.WeakKeyDictionary())
        self._managers_lock = threading.Lock()  # managers are made on the reader and model threads
        self._versions: weakref.WeakKeyDictionary[DiffusionModel, FileVersion | None] = (
            weakref.WeakKeyDictionary())
        self.rss_at_start = process_memory()["rss_bytes"]  # the bare replica, before any model

        async def open_slot(name: str) -> ModelSlot:
            slot = ModelSlot(name)
            await self._current(slot)
            return slot

        # A function, not a method: Ray keeps the multiplexer on the decorated object.
        self.slot = serve.multiplexed(max_num_models_per_replica=settings.max_models_per_replica)(
            open_slot)

    async def start(self) -> None:
        """Load the default model through the multiplexer, from the replica's (async) constructor.

        The router sends a model's requests to the replicas that report holding it and spills
        to others only when those are full; a replica that loaded its default model behind the
        multiplexer's back would report nothing, and all but the first replica asked would idle
        under load (measured: one of two Denoisers ran every forward at 16 clients).
        """
        await self.get(self.settings.default_model)

    async def get(self, name: str) -> DiffusionModel:
        """Model ``name``: loaded on first use, reloaded when its files changed since."""
        return await self._current(await self.slot(name))

    async def version(self, name: str) -> FileVersion | None:
        """The version of ``name``'s files now (None: unreadable right now, e.g. mid-copy: what
        is loaded stays in use); NotFoundError for a name no longer served."""
        try:
            return await asyncio.to_thread(self.catalog.version, name)
        except OSError:
            return None

    def version_of(self, model: DiffusionModel) -> FileVersion | None:
        """The version of the files ``model`` was loaded from."""
        return self._versions.get(model)

    async def _current(self, slot: ModelSlot) -> DiffusionModel:
        version = await self.version(slot.name)
        if slot.model is not None and version in (None, slot.version):
            return slot.model
        async with slot.lock:
            if slot.model is None or version not in (None, slot.version):
                if slot.model is not None:
                    logger.info("model %r changed on disk: reloading it", slot.name)
                slot.model = None  # the old weights go with the last request using them
                model = await self.worker.run(self.load, slot.name)
                self._versions[model] = version
                slot.model, slot.version = model, version
            return slot.model

    def load(self, name: str) -> DiffusionModel:
        path = self.catalog.path(name)  # NotFoundError for a name that is not (or no longer) served
        # A model the multiplexer just dropped goes when its last request ends; whatever of it
        # sits in a reference cycle is freed here rather than at some later collection, before
        # the next model takes its memory.
        gc.collect()
        with LoadTimer(name, "model"):  # raydiance_model_loads, _model_load_seconds
            model = load_model(path, components=self.components, device=self.device,
                               dtype=self.dtype, name=name)
        if self.prepare is not None:
            self.prepare(model)
        self.held.add(model)
        return model

    def memory_report(self) -> dict[str, Any]:
        """What this replica holds: each live model's components with their tensor bytes, its
        RSS now, at peak and before any model was loaded, and CUDA's allocated bytes."""
        return {"models": self.held.bytes_by_model(),
                "memory": {**process_memory(), "rss_at_start_bytes": self.rss_at_start}}

    def read_loras(self, model: DiffusionModel, loras: LoraSet) -> Callable[[], None] | None:
        """The slow part of putting ``loras`` on ``model``, before any batch waits for it: the
        files of those it lacks, read and checked here (any thread but the model's; an unusable
        file fails here). Returns the injection, to run on the model's thread (None: nothing
        to inject)."""
        manager = self._adapters(model)
        if manager is None:
            if loras:
                raise InvalidRequestError("loras", "this server has no loras_dir configured")
            return None
        start = time.perf_counter()
        try:
            prepared = manager.read(loras)
        except Exception:
            metrics.record_load(model.name, "lora", time.perf_counter() - start, ok=False)
            raise
        if not prepared:
            return None
        read_s = time.perf_counter() - start

        def inject() -> None:
            begun, ok = time.perf_counter(), False
            try:
                manager.load(loras, prepared)
                ok = True
            finally:  # raydiance_model_loads{kind="lora"}: the read and the injection together
                metrics.record_load(model.name, "lora", read_s + time.perf_counter() - begun, ok)
            self.held.publish()

        return inject

    def activate_loras(self, model: DiffusionModel, loras: LoraSet) -> None:
        """Put ``loras`` on the model (on the torch thread), timing the loads of new ones (none
        where ``read_loras`` ran first, unless evicted since); the adapters' tensors count in the
        components that took them."""
        manager = self._adapters(model)
        if manager is None:
            if loras:
                raise InvalidRequestError("loras", "this server has no loras_dir configured")
            return
        if all(name in manager.loaded for name, _ in loras):
            manager.activate(loras)
            return
        with LoadTimer(model.name, "lora"):
            manager.activate(loras)
        self.held.publish()

    def _adapters(self, model: DiffusionModel) -> AdapterManager | None:
        """The model's LoRA adapters (None when no loras_dir is set); the manager holds the
        model's modules, not the model, so the weak key lets both go together."""
        if self.settings.loras_dir is None:
            return None
        with self._managers_lock:
            manager = self._lora_managers.get(model)
            if manager is None:
                manager = self._lora_managers[model] = AdapterManager(
                    model, LoraLibrary(self.settings.loras_dir),
                    max_loaded=self.settings.max_loras_per_model)
        return manager
