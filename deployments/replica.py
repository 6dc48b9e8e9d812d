"""What every model-holding replica shares: one torch thread, a torch worker thread, its models."""
from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

from pipeline.device import default_dtype, select_device
from pipeline.errors import InvalidRequestError
from pipeline.model import DiffusionModel, load_model

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
    """This replica's models, loaded on first use (the default one at start) on its device."""

    def __init__(self, settings: StageSettings) -> None:
        self.settings = settings
        self.device = select_device(settings.accelerator)
        self.dtype = default_dtype(self.device)
        self._models: dict[str, DiffusionModel] = {}
        self._lock = threading.Lock()
        self.get(settings.default_model)

    def loaded(self, name: str) -> DiffusionModel | None:
        """The model if already in memory: a lookup cheap enough for the event loop."""
        return self._models.get(name)

    def get(self, name: str) -> DiffusionModel:
        if name not in self.settings.model_paths:
            raise InvalidRequestError("model", f"unknown model {name!r}; served: "
                                      f"{', '.join(self.settings.model_paths)}")
        with self._lock:
            if name not in self._models:
                self._models[name] = load_model(self.settings.model_paths[name], device=self.device,
                                                dtype=self.dtype, name=name)
            return self._models[name]


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
