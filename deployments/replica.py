"""What every model-holding replica shares: one torch thread, a torch worker thread, its models."""
from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

from pipeline.device import default_dtype, select_device
from pipeline.errors import InvalidRequestError
from pipeline.library import LoraLibrary
from pipeline.lora import AdapterManager, LoraSet
from pipeline.model import DiffusionModel, load_model

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
    """One thread that runs this replica's blocking torch work, off the event loop.

    One thread, not a pool: work queues in order, and a replica never runs two forwards at once
    on the cores Ray gave it.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))


class ModelStore:
    """This replica's models: loaded on first use off the event loop, at most
    ``max_models_per_replica`` kept (Ray Serve model multiplexing, which also tells the router
    which replica holds which model), the default one loaded by ``start``.

    ``await store.get(name)`` returns the model. A model dropped from the store stays alive for
    the requests still using it.
    """

    def __init__(self, settings: StageSettings, worker: TorchWorker) -> None:
        from ray import serve

        self.settings = settings
        self.catalog = settings.catalog()
        self.worker = worker
        self.device = select_device(settings.accelerator)
        self.dtype = default_dtype(self.device)

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
        with LoadTimer(name, "model"):  # raydiance_model_loads, _model_load_seconds
            return load_model(path, device=self.device, dtype=self.dtype, name=name)

    def adapters(self, model: DiffusionModel, part: str) -> AdapterManager | None:
        """The model's LoRA adapters for this stage's ``part`` (None when no loras_dir is set);
        kept on the model, so they go when it goes."""
        if self.settings.loras_dir is None:
            return None
        manager = model.extra.get("adapters")
        if manager is None:
            manager = model.extra["adapters"] = AdapterManager(
                model, LoraLibrary(self.settings.loras_dir),
                max_loaded=self.settings.max_loras_per_model, parts=(part,))
        return manager


def activate_loras(manager: AdapterManager | None, model: DiffusionModel,
                   loras: LoraSet) -> None:
    """Put ``loras`` on the model (on the torch thread), timing the loads of new ones."""
    if manager is None:
        if loras:
            raise InvalidRequestError("loras", "this server has no loras_dir configured")
        return
    missing = [name for name, _ in loras if name not in manager.loaded]
    if not missing:
        manager.activate(loras)
        return
    with LoadTimer(model.name, "lora"):
        manager.activate(loras)


def placement_report(store: ModelStore) -> dict[str, Any]:
    """What Ray handed this replica and what it runs on: the two differ on a fake GPU node."""
    import ray

    return {
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_available": torch.cuda.is_available(),
        "device": str(store.device),
        "dtype": str(store.dtype),
        "torch_threads": torch.get_num_threads(),
        "node_id": ray.get_runtime_context().get_node_id(),
    }
