"""One Ray cluster for the jobs tests, with two applications on it, deployed as ``serve run``
deploys a config: ``jobs`` (two Ingress replicas, so that a job submitted through one is read
and cancelled through the other) and ``capped`` (a short TTL and small caps)."""
from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from tools.tiny_shapes import MODEL_DIR

CAPPED = {"ttl_s": 6, "max_queued": 2, "max_running": 1, "image_bytes": 20000}


@dataclass
class App:
    url: str
    client: httpx.Client


@dataclass
class Apps:
    jobs: App
    capped: App


def _application(name: str, prefix: str, ingress_replicas: int, **args) -> dict:
    return {"name": name, "route_prefix": prefix, "import_path": "deployments.app:build_app",
            "args": {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu", **args},
            "deployments": [{"name": "Ingress", "num_replicas": ingress_replicas}]}


@pytest.fixture(scope="package")
def apps():
    import ray
    from ray import serve

    from tools.local_serve import deploy_config, free_port, wait_http

    ray.init(num_cpus=4, include_dashboard=False)  # logical CPUs: both apps' replicas fit
    try:
        port = free_port()
        deploy_config({"proxy_location": "HeadOnly",
                       "http_options": {"host": "127.0.0.1", "port": port},
                       "applications": [_application("jobs", "/", 2, jobs={"max_running": 4}),
                                        _application("capped", "/capped", 1, jobs=CAPPED)]},
                      timeout_s=240)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", timeout_s=60)
        wait_http(f"{url}/capped/healthz", timeout_s=60)
        with httpx.Client(base_url=url, timeout=120.0) as main, \
                httpx.Client(base_url=f"{url}/capped", timeout=120.0) as capped:
            yield Apps(App(url, main), App(f"{url}/capped", capped))
    finally:
        serve.shutdown()
        ray.shutdown()
