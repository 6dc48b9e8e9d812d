"""One local Ray for the hardening tests, with apps deployed on it as each test module needs.

Package-scoped, as in tests/integration: Ray and Serve start once for the package and stop after
its last test. ``deploy_app`` deploys a Raydiance app under its own name and route prefix on the
shared proxy (``/`` for the default app, e.g. ``/keyed`` for one with API keys), so several apps
with different args share one cluster; a module-scoped fixture that kills replicas deploys an
app of its own, so that nothing it breaks reaches the other modules.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve import Application  # noqa: E402

from deployments.app import build_app  # noqa: E402
from tools.local_serve import deploy, free_port, wait_http  # noqa: E402
from tools.random_models import write_lora_pair  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402
from pipeline.loading import load_model  # noqa: E402

LIMITS = {"max_width": 256, "max_height": 256, "max_steps": 50, "max_images": 4,
          "max_prompt_chars": 300, "max_input_bytes": 65536}  # a body limit of ~1.17 MiB
# Small CPU fractions: several apps share this 2-core machine's Ray (4 logical CPUs).
CPU_PLACEMENT = {"Ingress": {"num_cpus": 0.05}, "TextEncoder": {"num_cpus": 0.05},
                 "Denoiser": {"num_cpus": 0.3}, "VAEDecoder": {"num_cpus": 0.05},
                 "JobQueue": {"num_cpus": 0.01}}


@dataclass
class Cluster:
    """The package's Ray: its HTTP port, and the folders the apps serve from."""

    port: int
    loras_dir: Path
    checkpoints_dir: Path

    def url(self, route_prefix: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{route_prefix.rstrip('/')}"


def app_args(cluster: Cluster, **overrides: Any) -> dict[str, Any]:
    """The args of a test app: the built-in model on CPU, the package's folders, small limits."""
    args = {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu", "limits": LIMITS,
            "loras_dir": str(cluster.loras_dir), "checkpoints_dir": str(cluster.checkpoints_dir),
            "placement": {"cpu": CPU_PLACEMENT}}
    args.update(overrides)
    return args


@pytest.fixture(scope="package")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("hardening")
    loras, checkpoints = root / "loras", root / "checkpoints"
    loras.mkdir()
    checkpoints.mkdir()
    write_lora_pair(load_model(MODEL_DIR), loras, "a", seed=1)
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield Cluster(port, loras, checkpoints)
    finally:
        serve.shutdown()
        ray.shutdown()


DeployApp = Callable[..., str]


def with_deployment_options(app: Application, options: dict[str, dict[str, Any]]) -> Application:
    """``app`` with Serve options (``num_replicas``...) set on its deployments by name, as the
    ``deployments:`` list of serve_config.yaml sets them (the Ingress binds the stages' apps)."""

    def optioned(bound: Application) -> Application:
        deployment = bound._bound_deployment
        return Application(deployment.options(**options.get(deployment.name, {})))

    ingress = app._bound_deployment
    args = tuple(optioned(arg) if isinstance(arg, Application) else arg for arg in ingress.init_args)
    return Application(ingress.options(_init_args=args, **options.get(ingress.name, {})))


@pytest.fixture(scope="package")
def deploy_app(cluster: Cluster) -> DeployApp:
    """``deploy_app(name, route_prefix, deployments=None, **args)``: deploys an app and returns
    its base URL; ``deployments`` maps a deployment's name to its Serve options."""

    def deploy_one(name: str, route_prefix: str = "/",
                   deployments: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> str:
        app = build_app(app_args(cluster, **overrides))
        deploy(with_deployment_options(app, deployments or {}), name, timeout_s=240,
               route_prefix=route_prefix)
        url = cluster.url(route_prefix)
        wait_http(f"{url}/healthz", timeout_s=60)
        return url

    return deploy_one


@pytest.fixture(scope="package")
def service(deploy_app: DeployApp) -> Iterator[httpx.Client]:
    """The default app at ``/`` (one replica per stage), as a client with a base URL."""
    url = deploy_app("raydiance", "/")
    with httpx.Client(base_url=url, timeout=120.0) as client:
        yield client
