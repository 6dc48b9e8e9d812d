"""``serve run serve_config.yaml`` as a user runs it: first image, then a clean Ctrl-C shutdown."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve_config.yaml"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def config_to_run(tmp_path: Path) -> tuple[Path, int]:
    """The shipped config; a copy on a free port only if something already listens on 8000."""
    config = yaml.safe_load(CONFIG.read_text())
    port = config["http_options"]["port"]
    if port_free(port):
        return CONFIG, port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config["http_options"]["port"] = port
    copy = tmp_path / "serve_config.yaml"
    copy.write_text(yaml.safe_dump(config))
    return copy, port


def wait_for_ready_line(log: Path, process: subprocess.Popen, timeout_s: float) -> tuple[str, list]:
    """The line saying the service is ready, and what /healthz answered while waiting for it."""
    deadline = time.monotonic() + timeout_s
    healthz: list = []
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve run exited early with {process.returncode}")
        ready = [line for line in log.read_text().splitlines() if "Raydiance is ready" in line]
        if ready:
            return ready[0], healthz
        try:
            response = httpx.get(f"{url_of(log)}/healthz", timeout=10)
            healthz.append((response.status_code, response.headers.get("retry-after")))
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"no ready line after {timeout_s}s:\n{log.read_text()[-3000:]}")


def url_of(log: Path) -> str:
    return log.parent.joinpath("url").read_text()


def test_serve_run_first_image_then_clean_shutdown(tmp_path):
    config, port = config_to_run(tmp_path)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    script = Path(sys.executable).parent / "serve"  # the `serve` of this interpreter's environment
    serve_cli = [str(script)] if script.exists() else [sys.executable, "-c",
                                                       "from ray.serve.scripts import cli; cli()"]
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "url").write_text(url)
    log = open(tmp_path / "serve_run.log", "w")
    # A shell runs background jobs with SIGINT ignored, and children inherit that: give `serve
    # run` the default handling, as in a terminal, so that Ctrl-C (SIGINT) reaches it.
    process = subprocess.Popen([*serve_cli, "run", str(config)], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        start = time.monotonic()
        line, healthz = wait_for_ready_line(tmp_path / "serve_run.log", process, timeout_s=240)
        ready_s = time.monotonic() - start
        assert f"{url}/" in line, line
        # while the models loaded /healthz said 503 with Retry-After (404: Ray's proxy had no
        # route yet), and once it said ok it stayed ok (the line reaches the log a moment later)
        statuses = [status for status, _ in healthz]
        assert set(statuses) <= {404, 503, 200}, healthz
        assert all(retry for status, retry in healthz if status == 503), healthz
        first_ok = statuses.index(200) if 200 in statuses else len(statuses)
        assert 503 not in statuses[first_ok:], healthz
        # the line means it: the first request after it is served, and /healthz says ok
        assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        response = httpx.post(f"{url}/v1/generate", timeout=60,
                              json={"prompt": "a red circle on a blue background", "seed": 1})
        first_image_s = time.monotonic() - start
        assert response.status_code == 200, response.text[:300]
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG")
        assert response.headers["x-raydiance-seed"] == "1"
        print(f"ready line after {ready_s:.1f}s, first image after {first_image_s:.1f}s")

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while not port_free(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert port_free(port), "the HTTP port is still open after shutdown"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()
        if process.returncode not in (0, None):
            print((tmp_path / "serve_run.log").read_text()[-5000:])
