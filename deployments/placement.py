"""Where each stage runs: CPU or GPU ``ray_actor_options`` chosen from ``accelerator``.

``auto`` asks the cluster: GPU placement (fractional cards for CLIP and VAE, a whole card for the
UNet) when it has GPUs, CPU placement otherwise, so one serve_config.yaml starts on a laptop and
on a GPU node. Ray applies a ``ray_actor_options`` written under ``deployments:`` in the config
file on top of the application, so the user's own options always win over these.
"""
from __future__ import annotations

import copy
from typing import Any

import ray

from pipeline.accelerator import Accelerator

from deployments.settings import Placement


def cluster_gpus() -> float:
    """GPUs the Ray cluster has now (0 when Ray is not running: the builder is then local)."""
    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def use_gpus(accelerator: Accelerator, gpus: float | None = None) -> bool:
    if accelerator == "cpu":
        return False
    if accelerator == "cuda":
        return True
    return (cluster_gpus() if gpus is None else gpus) > 0


def actor_options(stage: str, accelerator: Accelerator, placement: Placement,
                  gpus: float | None = None) -> dict[str, Any]:
    """The ``ray_actor_options`` of ``stage`` (a deployment name) for this cluster."""
    table = placement.gpu if use_gpus(accelerator, gpus) else placement.cpu
    return copy.deepcopy(table.get(stage, {}))
