"""Deploying the app on an already started Ray from Python, with timeouts: tests and benchmarks.

``serve.run`` waits for an application with no limit, and a replica asking for resources no
node has waits forever; these helpers deploy without blocking and poll with a deadline.
"""
from __future__ import annotations

import socket
import time
from typing import Any

from ray import serve
from ray.serve.api import _run
from ray.serve.schema import ApplicationStatus, ServeDeploySchema


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deploy(app: serve.Application, name: str, timeout_s: float = 180.0, route_prefix: str = "/") -> None:
    """Deploy ``app`` (a built application) and wait until it is RUNNING."""
    _run(app, _blocking=False, name=name, route_prefix=route_prefix)
    wait_running(name, timeout_s)


def deploy_config(config: dict[str, Any], timeout_s: float = 180.0) -> None:
    """Deploy a serve_config.yaml-shaped dict as ``serve run`` does: Ray calls the builder."""
    from ray.serve._private.api import serve_start

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(),
                         proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
    for app in schema.applications:
        wait_running(app.name, timeout_s)


def wait_running(name: str, timeout_s: float) -> None:
    """Wait until application ``name`` is RUNNING; raise with Serve's message otherwise."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"application {name!r} failed to deploy: {status.message}")
        time.sleep(0.5)
    detail = {n: (d.status, d.message) for n, d in status.deployments.items()} if status else None
    raise TimeoutError(f"application {name!r} not running after {timeout_s:.0f}s: {detail}")


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    """Wait until ``url`` answers 200 (the proxy can lag the application's RUNNING status)."""
    import httpx  # a test extra, not a service dependency

    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5.0)
            if response.status_code == 200:
                return
            last = response.status_code
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.5)
    raise TimeoutError(f"{url} not answering 200 after {timeout_s:.0f}s (last: {last!r})")
