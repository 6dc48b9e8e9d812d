"""A real local Ray running Raydiance with a fixed metrics port, a real Prometheus scraping it
every second, and one burst of HTTP traffic, shared by the package's tests.

Package-scoped: this package starts and stops its own Ray (tests/integration has its own), so
the two never share a cluster and each shuts down before the next package starts.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import pytest  # noqa: E402

from tools.tiny_shapes import MODEL_DIR  # noqa: E402

from tests.observability.prom import Prometheus, Scrape, poll, prometheus_binary, scrape  # noqa: E402

APP_NAME = "raydiance"
GENERATE = "/v1/generate"
PROMPT_A = "a red circle on a blue background"
PROMPT_B = "a yellow square on a green background"


@dataclass
class App:
    url: str
    metrics_url: str
    client: httpx.Client
    has_gpu: bool

    def scrape(self) -> Scrape:
        return scrape(self.metrics_url)


# The app checks API keys but lets loopback through without one (``allow_loopback``): the
# burst's requests need no key, and one request with a wrong key feeds raydiance_auth_failures.
WRONG_KEY = {"Authorization": "Bearer not-a-configured-key-0123456789"}


@pytest.fixture(scope="package")
def app(tmp_path_factory):
    import ray
    from ray import serve

    from deployments.app import build_app
    from tools.local_serve import deploy, free_port, wait_http

    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port)
    try:
        http_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
        keys = tmp_path_factory.mktemp("auth") / "api_keys"
        keys.write_text("observability-test-key-0123456789\n")
        deploy(build_app({"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu",
                          "auth": {"keys_file": str(keys), "allow_loopback": True}}),
               APP_NAME, timeout_s=240)
        url = f"http://127.0.0.1:{http_port}"
        wait_http(f"{url}/healthz", timeout_s=60)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        poll(lambda: httpx.get(metrics_url, timeout=5.0).status_code == 200, 60, "Ray metrics port")
        with httpx.Client(base_url=url, timeout=120.0) as client:
            yield App(url, metrics_url, client, ray.cluster_resources().get("GPU", 0) > 0)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="package")
def prometheus(app):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run does)")
    from tools.local_serve import free_port

    with tempfile.TemporaryDirectory(prefix="raydiance-prom-") as workdir:
        metrics_target = app.metrics_url.removeprefix("http://").removesuffix("/metrics")
        server = Prometheus(binary, Path(workdir), [metrics_target], free_port())
        try:
            server.wait_ready(timeout_s=30)
            poll(server.targets_up, 30, "prometheus scraping Ray's metrics port")
            yield server
        finally:
            server.stop()


@dataclass
class Traffic:
    """What the burst sent, and Ray's metrics before and after it."""

    before: Scrape
    after: Scrape
    ok: list[httpx.Response] = field(default_factory=list)
    bad: list[httpx.Response] = field(default_factory=list)
    steps_requested: int = 0
    seconds: float = 0.0

    def rise(self, name: str, **labels: str) -> float:
        return self.after.total(name, **labels) - self.before.total(name, **labels)


# (body, expected status). Request 1 runs alone (an embedding-cache miss), 2 and 3 together
# (2 hits prompt A's cached conditioning; 3 asks First Block Cache to skip freely), 4 repeats 1
# exactly (a hit: its PNG must equal 1's), 5 is refused by validation.
BURSTS = [
    [({"prompt": PROMPT_A, "seed": 1, "steps": 4}, 200)],
    [({"prompt": PROMPT_A, "seed": 2, "steps": 4}, 200),
     ({"prompt": PROMPT_B, "seed": 3, "steps": 6, "cache": {"threshold": 1.0}}, 200)],
    [({"prompt": PROMPT_A, "seed": 1, "steps": 4}, 200),
     ({"prompt": PROMPT_A, "steps": 0}, 422)],
]


JOB_PROMPT = "a white triangle on a black background"  # its own: the burst's cache counts stay


def _after_a_job(app) -> Scrape:
    """A scrape once one job (``/v1/jobs``) has finished and every count of it is exported, so
    that the jobs' metrics exist and the burst's counts start after it."""
    start = app.scrape()
    job = app.client.post("/v1/jobs", json={"prompt": JOB_PROMPT, "seed": 4, "steps": 3})
    assert job.status_code == 202, job.text
    poll(lambda: app.client.get(f"/v1/jobs/{job.json()['id']}").json()["status"] == "succeeded",
         60, "the job")

    def exported() -> Scrape | None:
        now = app.scrape()
        expected = {"ray_raydiance_jobs_finished_total": 1, "ray_raydiance_job_queue_seconds_count": 1,
                    "ray_raydiance_images_total": 1, "ray_raydiance_denoise_steps_total": 3,
                    "ray_raydiance_stage_latency_seconds_count": 3}  # encode, denoise, decode
        rose = all(now.total(name) - start.total(name) >= count for name, count in expected.items())
        return now if rose else None

    return poll(exported, 30, "the job's metrics", interval_s=1.0)


@pytest.fixture(scope="package")
def traffic(app, prometheus) -> Traffic:
    before = _after_a_job(app)
    start = time.monotonic()
    result = Traffic(before=before, after=before)
    # Before the burst: the Ingress exports it with (or before) the burst's last count.
    assert app.client.get("/v1/models", headers=WRONG_KEY).status_code == 401
    with ThreadPoolExecutor(max_workers=2) as pool:
        for burst in BURSTS:
            responses = list(pool.map(lambda item: app.client.post(GENERATE, json=item[0]), burst))
            for (body, status), response in zip(burst, responses):
                assert response.status_code == status, response.text
                (result.ok if status == 200 else result.bad).append(response)
                if status == 200:
                    result.steps_requested += body["steps"]
    result.seconds = time.monotonic() - start
    sent_ok = len(result.ok)

    def settled() -> Scrape | None:
        # Ray exports custom metrics a few seconds after they change: wait until the last
        # request's count is visible and the engine's steps have caught up (or time runs out).
        now = app.scrape()
        rose = now.total("ray_raydiance_requests_total", endpoint=GENERATE, status="200") \
            - before.total("ray_raydiance_requests_total", endpoint=GENERATE, status="200")
        steps = now.total("ray_raydiance_denoise_steps_total") \
            - before.total("ray_raydiance_denoise_steps_total")
        images = now.total("ray_raydiance_images_total") - before.total("ray_raydiance_images_total")
        return now if rose >= sent_ok and images >= sent_ok and steps >= result.steps_requested else None

    try:
        result.after = poll(settled, 30, "metrics of the burst", interval_s=1.0)
    except TimeoutError:
        result.after = app.scrape()  # the tests then say which counts fell short
    return result
