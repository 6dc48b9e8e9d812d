"""What every model-holding replica (TextEncoder, Denoiser, VAEDecoder) shares: torch on one
intra-op thread, a worker thread for blocking torch work, its models (only the components its
stage runs, with their LoRA adapters), and ``stats()``/``placement()``, the report of what it holds.

``StageReplica`` is a plain base class: the ``@serve.deployment`` stages inherit its methods,
and Serve finds the multiplexed ``get_model`` among the instance's attributes.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import os
import weakref
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ray
import torch
from ray import serve

from pipeline.device import default_dtype, select_device
from pipeline.errors import InvalidRequestError
from pipeline.library import LoraLibrary
from pipeline.loading import load_model
from pipeline.lora import AdapterManager, LoraSet
from pipeline.memory import (IDLE_BEFORE_RELEASE_S, component_bytes, process_memory,
                             release_freed_memory)
from pipeline.model import Component, DiffusionModel

from deployments import metrics
from deployments.metrics import LoadTimer
from deployments.settings import StageSettings

T = TypeVar("T")


def pin_torch_threads() -> None:
    """One intra-op thread per replica: on shared cores two threads per replica ran 2-20x slower."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass


class TorchWorker:
    """One thread that runs this replica's blocking torch work (model loads, and the batched
    stages' forwards), off the event loop.

    One thread, not a pool: work queues in order, and a TextEncoder or VAEDecoder never runs two
    forwards at once on the cores Ray gave it (the Denoiser's forwards run on its engine's own
    thread; its worker only loads models). When the last queued piece of work is done, the
    memory it freed goes back to the OS, so an idle replica holds its weights and not its last
    batch.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self._pending = 0  # calls queued or running; touched on the event loop only

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            self._pending -= 1
            if self._pending == 0:
                loop.call_later(IDLE_BEFORE_RELEASE_S, self._release_if_idle)

    def _release_if_idle(self) -> None:
        if self._pending == 0:  # still idle: work that came in would only allocate it again
            self._pool.submit(release_freed_memory)


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


class ModelStore:
    """This replica's models: the ``components`` its stage runs and nothing else, loaded on first
    use off the event loop, at most ``max_models_per_replica`` kept (Ray Serve model
    multiplexing, which also tells the router which replica holds which model), the default one
    loaded by ``start``.

    ``await store.get(name)`` returns the model. A model dropped from the store stays alive for
    the requests still using it. Each model's LoRA adapters are kept beside it, keyed weakly, so
    they go when it goes.
    """

    def __init__(self, settings: StageSettings, worker: TorchWorker,
                 components: tuple[Component, ...]) -> None:
        self.settings = settings
        self.catalog = settings.catalog()
        self.worker = worker
        self.components = components
        self.device = select_device(settings.accelerator)
        self.dtype = default_dtype(self.device)
        self.held = HeldModels()
        self._lora_managers: weakref.WeakKeyDictionary[DiffusionModel, AdapterManager] = (
            weakref.WeakKeyDictionary())
        self.rss_at_start = process_memory()["rss_bytes"]  # the bare replica, before any model

        async def get(name: str) -> DiffusionModel:
            return await self.worker.run(self.load, name)

        # A function, not a method: Ray keeps the multiplexer on the decorated object.
        self.get = serve.multiplexed(max_num_models_per_replica=settings.max_models_per_replica)(get)

    async def start(self) -> None:
        """Load the default model through the multiplexer, from the replica's (async) constructor.

        The router sends a model's requests to the replicas that report holding it and spills
        to others only when those are full; a replica that loaded its default model behind the
        multiplexer's back would report nothing, and all but the first replica asked would idle
        under load (measured: one of two Denoisers ran every forward at 16 clients).
        """
        await self.get(self.settings.default_model)

    def load(self, name: str) -> DiffusionModel:
        path = self.catalog.path(name)  # NotFoundError for a name that is not (or no longer) served
        # A model the multiplexer just dropped goes when its last request ends; whatever of it
        # sits in a reference cycle is freed here rather than at some later collection, before
        # the next model takes its memory.
        gc.collect()
        with LoadTimer(name, "model"):  # raydiance_model_loads, _model_load_seconds
            model = load_model(path, components=self.components, device=self.device,
                               dtype=self.dtype, name=name)
        self.held.add(model)
        return model

    def memory_report(self) -> dict[str, Any]:
        """What this replica holds: each live model's components with their tensor bytes, its
        RSS now, at peak and before any model was loaded, and CUDA's allocated bytes."""
        return {"models": self.held.bytes_by_model(),
                "memory": {**process_memory(), "rss_at_start_bytes": self.rss_at_start}}

    def activate_loras(self, model: DiffusionModel, loras: LoraSet) -> None:
        """Put ``loras`` on the model (on the torch thread), timing the loads of new ones; the
        adapters' tensors count in the components that took them."""
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
        manager = self._lora_managers.get(model)
        if manager is None:
            manager = self._lora_managers[model] = AdapterManager(
                model, LoraLibrary(self.settings.loras_dir),
                max_loaded=self.settings.max_loras_per_model)
        return manager


class StageReplica:
    """Base of the three model-holding stages: call ``__init__`` first from the stage's own
    (async) constructor and ``await self.store.start()`` last; a stage adds its own counters to
    ``stats()`` through ``stage_stats``."""

    def __init__(self, settings: StageSettings, components: tuple[Component, ...]) -> None:
        pin_torch_threads()
        self.worker = TorchWorker()
        self.store = ModelStore(settings, self.worker, components)
        self.get_model = self.store.get  # multiplexed: Serve finds it on the replica

    def stage_stats(self) -> dict[str, Any]:
        return {}

    def stats(self) -> dict[str, Any]:
        """For tests and operators: which replica, each live model's components with their
        tensor bytes, the replica's memory, and the stage's own counters."""
        return {"replica": _replica_id(), **self.store.memory_report(), **self.stage_stats()}

    def placement(self) -> dict[str, Any]:
        """What Ray handed this replica and what it runs on (the two differ on a fake GPU node):
        the device and dtype are those of the stage's own component, as loaded."""
        store = self.store
        device, dtype = store.device, store.dtype
        models = store.held.models()
        if models:
            weight = next(next(iter(models[0].modules().values())).parameters())
            device, dtype = weight.device, weight.dtype
        return {
            "replica": _replica_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_available": torch.cuda.is_available(),
            "device": str(device),
            "dtype": str(dtype),
            "components": list(store.components),
            "torch_threads": torch.get_num_threads(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }


def _replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id
