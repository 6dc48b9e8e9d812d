"""What every model-holding replica (TextEncoder, Denoiser, VAEDecoder) shares: torch on one
intra-op thread, a worker thread for blocking torch work, its models (``ModelStore``: only the
components its stage runs, with their LoRA adapters), and ``stats()``/``placement()``, the report
of what it holds.

``StageReplica`` is a plain base class: the ``@serve.deployment`` stages inherit its methods,
and Serve finds the multiplexed ``model_slots`` among the instance's attributes.

The stages import torch, diffusers and transformers inside their methods, never at module level:
``deployments.app`` imports every deployment's module to bind it, in the Ray task that builds the
application (and the Ingress replica imports the app's modules too), and neither ever runs a
stage. A module-level import would cost both seconds of CPU at each cold start
(``tests/unit/test_code_shape.py`` checks). Serve pickles a deployment's class by value when it
is declared, so even a lazily loaded module object in its globals would be imported then.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray import serve

from pipeline.model_configs import Component

from deployments.settings import StageSettings

if TYPE_CHECKING:
    from pipeline.model import DiffusionModel


class StageReplica:
    """Base of the three model-holding stages: call ``__init__`` first from the stage's own
    (async) constructor and ``await self.store.start()`` last; a stage adds its own counters to
    ``stats()`` through ``stage_stats``."""

    def __init__(self, settings: StageSettings, components: tuple[Component, ...],
                 prepare: Callable[[DiffusionModel], None] | None = None) -> None:
        from deployments.model_store import ModelStore  # torch, diffusers: see the module's doc
        from deployments.torch_worker import TorchWorker, pin_torch_threads

        pin_torch_threads()
        self.worker = TorchWorker()
        self.store = ModelStore(settings, self.worker, components, prepare)
        self.get_model = self.store.get
        self.model_slots = self.store.slot  # multiplexed: Serve finds it among the attributes

    def stage_stats(self) -> dict[str, Any]:
        return {}

    def check_health(self) -> None:
        """Serve's periodic health check (every 10 s); it also sets the model-bytes gauges
        again: set only when the held models change, their series went missing from Ray's
        export once the replica had been quiet a while."""
        self.store.held.publish()

    def stats(self) -> dict[str, Any]:
        """For tests and operators: which replica, each live model's components with their
        tensor bytes, the replica's memory, and the stage's own counters."""
        return {"replica": _replica_id(), **self.store.memory_report(), **self.stage_stats()}

    def placement(self) -> dict[str, Any]:
        """What Ray handed this replica and what it runs on (the two differ on a fake GPU node):
        the device and dtype are those of the stage's own component, as loaded."""
        import torch

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
