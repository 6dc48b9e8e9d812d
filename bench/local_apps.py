"""The HTTP benchmarks' common ground: a local Ray, Serve apps deployed on it from config dicts,
and the requests sent to them (one at a time, timed, or many at once for images per second).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tools.local_serve import deploy_config  # noqa: E402
from tools.tiny_shapes.world import TRAIN_SCENES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GUIDANCE = 5.0
RAY_CPUS = 2  # Ray resources per app where apps compare: each takes its turn on this machine's 2 cores
# First Block Cache off: the benchmarks compare the same computation (the baselines have no
# cache; bench_cache measures the cache).
NO_CACHE = {"cache": {"threshold": 0}}


def start_ray(num_cpus: int, object_store_memory: int | None = None) -> None:
    """A local Ray for a benchmark's apps; replicas import bench/ and deployments/ whether or
    not the project is pip-installed."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_memory)


def app(name: str, import_path: str, args: dict, deployments: Sequence[dict] = (),
        route_prefix: str | None = None) -> dict:
    """One application of a Serve config, at ``/NAME`` unless ``route_prefix`` says otherwise."""
    return {"name": name, "route_prefix": route_prefix or f"/{name}", "import_path": import_path,
            "args": args, "deployments": list(deployments)}


def deploy_apps(port: int, applications: list[dict], timeout_s: float) -> str:
    """Deploy ``applications`` behind one local HTTP proxy on ``port``; the base URL."""
    deploy_config({"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
                   "applications": applications}, timeout_s=timeout_s)
    return f"http://127.0.0.1:{port}"


def body(i: int, steps: int, extra: dict | None = None) -> dict:
    """Request ``i``: a built-in model prompt and seed ``i``; ``extra``: more Raydiance API fields
    (the whole-pipeline baseline ignores them)."""
    return {"prompt": TRAIN_SCENES[i % len(TRAIN_SCENES)].prompt, "seed": i, "steps": steps,
            "guidance_scale": GUIDANCE, **(extra or {})}


def post(client: httpx.Client, url: str, payload: dict[str, Any]) -> float:
    """Seconds until ``payload`` was answered with a success."""
    start = time.perf_counter()
    response = client.post(url, json=payload)
    response.raise_for_status()
    return time.perf_counter() - start


def throughput(url: str, concurrency: int, payloads: list[dict], warm: list[dict], label: str) -> float:
    """Images per second with ``concurrency`` clients sending ``payloads``, after the ``warm``
    ones were answered one by one (caches filled, adapters loaded)."""
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(concurrency) as pool:
        for payload in warm:
            post(client, url, payload)
        start = time.perf_counter()
        list(tqdm(pool.map(lambda p: post(client, url, p), payloads), total=len(payloads),
                  desc=f"{label} c={concurrency}", leave=False))
        return len(payloads) / (time.perf_counter() - start)


def throughput_runs(series: dict[str, tuple[str, dict]], levels: list[int], requests: Callable[[int], int],
                    steps: int, repeats: int) -> dict[str, dict[int, list[float]]]:
    """Images/s of each series (label: URL, extra request fields) at each concurrency, once per
    run, ``requests(concurrency)`` requests each: within a run the series take turns at each
    level, so that whatever else the machine does hits all alike."""
    rates: dict[str, dict[int, list[float]]] = {label: {c: [] for c in levels} for label in series}
    for _ in tqdm(range(repeats), desc="throughput runs"):
        for c in levels:
            for label, (url, extra) in series.items():
                payloads = [body(i, steps, extra) for i in range(requests(c))]
                rates[label][c].append(throughput(url, c, payloads, [body(0, steps, extra)], label))
    return rates
