"""Requests spread over every Denoiser replica, not only the first one that loaded the model.

Ray Serve's router sends a multiplexed model's requests to the replicas that report holding it
and spills over only when those are full (``max_ongoing_requests``). Each stage loads its default
model through the multiplexer at start, so every replica reports it and the router balances by
queue length. Runs on its own local Ray, after the fake-GPU cluster of this package is gone.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import pytest  # noqa: E402

from deployments.settings import PROJECT_ROOT  # noqa: E402
from tools.local_serve import deploy_config, free_port, wait_http  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402

APP = "two-denoisers"


@pytest.fixture(scope="module")
def two_denoisers():
    import ray
    from ray import serve

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        port = free_port()
        deploy_config({
            "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{
                "name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app",
                "args": {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu"},
                "deployments": [{"name": "Denoiser", "num_replicas": 2}],
            }]}, timeout_s=240)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", timeout_s=60)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def forwards_by_replica(replicas: int = 2, calls: int = 40) -> dict[str, int]:
    """Each Denoiser replica's forward count; idle replicas are picked at random, so a few
    dozen calls reach them all."""
    from ray import serve

    handle = serve.get_deployment_handle("Denoiser", APP)
    seen: dict[str, int] = {}
    for _ in range(calls):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats["forwards"]
        if len(seen) == replicas:
            break
    assert len(seen) == replicas, f"reached only {sorted(seen)}"
    return seen


def test_concurrent_requests_reach_both_denoisers_after_one_has_served(two_denoisers):
    def generate(seed: int) -> None:
        response = httpx.post(f"{two_denoisers}/v1/generate", timeout=120, json={
            "prompt": "a red circle on a blue background", "seed": seed, "steps": 8})
        assert response.status_code == 200, response.text

    generate(0)  # one replica has now served the model (and once was the only one to report it)
    before = forwards_by_replica()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(generate, range(1, 9)))
    after = forwards_by_replica()
    ran = {replica: after[replica] - before[replica] for replica in after}
    assert all(count > 0 for count in ran.values()), ran
