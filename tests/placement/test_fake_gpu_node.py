"""Placement on a Ray cluster with a fake GPU node (ray.cluster_utils.Cluster).

The GPU node has GPU resources but no CUDA: ``accelerator: auto`` must give the stages GPU
placement (the Denoiser a whole GPU id), the replicas must still run on the CPU because torch
sees no CUDA, and a ``ray_actor_options`` in the config must win over the automatic placement.
Runs in its own package so that the integration tests' Ray is shut down first.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import pytest  # noqa: E402

from deployments.settings import PROJECT_ROOT  # noqa: E402
from tools.local_serve import deploy_config, free_port, wait_http  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402

APP = "fake-gpu"


def config(port: int, deployments: list[dict] | None = None) -> dict:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app",
            "args": {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "auto"},
            "deployments": deployments or [],
        }],
    }


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # The nodes' workers import deployments/ whether or not the project is pip-installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    fake = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                          "include_dashboard": False})
    try:
        # Two fake GPUs; aux_gpu marks the node with the small card, as
        # cluster/serve_config.gpu.yaml lays the stages out.
        fake.add_node(num_cpus=2, num_gpus=2, resources={"aux_gpu": 1})
        ray.init(address=fake.address)
        fake.wait_for_nodes(timeout=60)
        yield fake
    finally:
        serve.shutdown()
        ray.shutdown()
        fake.shutdown()


def placement(deployment: str, timeout_s: float = 60.0) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle(deployment, APP)
    return handle.placement.remote().result(timeout_s=timeout_s)


def test_auto_placement_on_a_fake_gpu_node_then_config_wins(cluster):
    port = free_port()
    deploy_config(config(port), timeout_s=240)
    denoiser = placement("Denoiser")
    assert denoiser["gpu_ids"], denoiser  # Ray gave it a GPU...
    assert denoiser["cuda_visible_devices"] not in (None, "")
    assert not denoiser["cuda_available"] and denoiser["device"] == "cpu"  # ...torch runs on CPU
    assert denoiser["torch_threads"] == 1
    encoder, decoder = placement("TextEncoder"), placement("VAEDecoder")
    assert encoder["gpu_ids"] and decoder["gpu_ids"]  # fractions of a card
    assert set(denoiser["gpu_ids"]).isdisjoint(encoder["gpu_ids"] + decoder["gpu_ids"])

    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", timeout_s=60)
    response = httpx.post(f"{url}/v1/generate", json={"prompt": "a red circle on a blue background",
                                                       "steps": 2}, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"

    # The user's ray_actor_options in the config replace the automatic GPU placement.
    deploy_config(config(port, [{"name": "Denoiser", "ray_actor_options": {"num_cpus": 0.5}}]),
                  timeout_s=240)
    deadline = time.monotonic() + 120
    while (denoiser := placement("Denoiser"))["gpu_ids"] and time.monotonic() < deadline:
        time.sleep(1)  # the old replica answers until the new one has replaced it
    assert denoiser["gpu_ids"] == []
    assert placement("TextEncoder")["gpu_ids"]  # the others keep their automatic placement
