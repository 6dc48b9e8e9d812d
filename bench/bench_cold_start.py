"""Cold start: ``serve run serve_config.yaml`` to the first image, and where the time goes.

    python -m bench.bench_cold_start [--repeats 3] [--no-record]

Runs the shipped config as a user does (a fresh local Ray each time; a copy on a free port when
8000 is taken), sends the README's request as soon as the ready line appears, then stops it with
Ctrl-C. The phases come from the timestamps of the log ``serve run`` prints: Ray's start, Serve's
start, the app's import and build (``build_app``, in a Ray task), the replicas (each logs its
own start: Ray's worker, the imports, the constructor: see ``deployments/startup.py``), the ready
line (``deployments/api/readiness.py``) and the first image. Target: first image <= 15 s.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from tqdm import tqdm

from bench.report import Repeated, markdown_table, parse_args, pyplot
from tools.local_serve import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serve_config.yaml"
STAGES = ("Ingress", "TextEncoder", "Denoiser", "VAEDecoder", "JobQueue")
TARGET_S = 15.0
# Ray's driver lines start "2026-12-01 03:57:43,064\t"; Serve's and the replicas' "INFO 2026-12-01 03:57:44,408 "
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
MARKS = {"ray": "Started a local Ray instance", "serve": "Started Serve in namespace",
         "build_start": "Importing and building app", "built": "Imported and built app",
         "ready": "Raydiance is ready"}
REPLICA = re.compile(r"(\w+) replica started in ([\d.]+) s: worker ([\d.]+) s, imports ([\d.]+) s, "
                     r"constructor ([\d.]+) s")
PHASES = ("Ray starts", "Serve starts", "app import and build", "replicas start",
          "ready line", "first request")


@dataclass
class Run:
    phases: dict[str, float] = field(default_factory=dict)  # seconds each, in order
    replicas: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    first_image_s: float = 0.0


def stamp(line: str) -> float | None:
    found = STAMP.search(line)
    if found is None:
        return None
    return dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def config_copy(folder: Path) -> tuple[Path, int]:
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    copy = folder / "serve_config.yaml"
    copy.write_text(yaml.safe_dump(config))
    return copy, port


def one_run(folder: Path, timeout_s: float = 180.0) -> Run:
    config, port = config_copy(folder)
    log_path = folder / "serve_run.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    serve_cli = Path(sys.executable).parent / "serve"
    with open(log_path, "w") as log:
        start = time.time()
        process = subprocess.Popen([str(serve_cli), "run", str(config)], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            image_at = wait_ready_then_generate(log_path, port, process, start + timeout_s)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    return parse(log_path.read_text(), start, image_at)


def wait_ready_then_generate(log_path: Path, port: int, process: subprocess.Popen, deadline: float) -> float:
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if MARKS["ready"] in log_path.read_text():
            response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=60,
                                  json={"prompt": "a red circle on a blue background", "seed": 1})
            response.raise_for_status()
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"no ready line:\n{log_path.read_text()[-3000:]}")


def parse(text: str, start: float, image_at: float) -> Run:
    at: dict[str, float] = {}
    run = Run(first_image_s=image_at - start)
    replica_ends: list[float] = []
    for line in text.splitlines():
        for mark, words in MARKS.items():
            if words in line and mark not in at and (t := stamp(line)) is not None:
                at[mark] = t
        if (found := REPLICA.search(line)) and (t := stamp(line)) is not None:
            name, total, worker, imports, constructor = found.groups()
            run.replicas[name] = (float(total), float(worker), float(imports), float(constructor))
            replica_ends.append(t)
    missing = [m for m in MARKS if m not in at] + [s for s in STAGES if s not in run.replicas]
    if missing:
        raise RuntimeError(f"not in the log: {missing}")
    points = [start, at["ray"], at["serve"], at["built"], max(replica_ends), at["ready"], image_at]
    run.phases = {name: b - a for name, a, b in zip(PHASES, points, points[1:])}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args, report = parse_args(parser, "bench.bench_cold_start")
    runs = []
    for _ in tqdm(range(args.repeats), desc="cold starts"):
        with tempfile.TemporaryDirectory() as folder:
            runs.append(one_run(Path(folder)))
            time.sleep(3)  # the previous Ray's processes gone
    phases = markdown_table(["phase", "s"], [
        *((name, Repeated.of([r.phases[name] for r in runs])) for name in PHASES),
        ("**serve run to first image**", Repeated.of([r.first_image_s for r in runs]))])
    replicas = markdown_table(["replica", "start, total s", "Ray worker s", "imports s", "constructor s"], [
        (name, *(Repeated.of([r.replicas[name][k] for r in runs]) for k in range(4))) for name in STAGES])
    report.record("cold start: serve run to the first image", phases + "\n\n" + replicas,
                  f"`serve run serve_config.yaml` as shipped (a free port), a fresh local Ray each run; the "
                  f"README's request sent as soon as the ready line is printed. Target: first image <= "
                  f"{TARGET_S:.0f} s. Phases from the log's timestamps; the replicas start in parallel "
                  f"(the second table: each replica's own start, from its log line). {args.repeats} runs.")
    report.save_figure(plot(runs), "cold_start")


def plot(runs: list[Run]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.4))
    left = 0.0
    colours = plt.get_cmap("tab10").colors
    for i, name in enumerate(PHASES):
        width = Repeated.of([r.phases[name] for r in runs]).median
        ax.barh([0], [width], left=left, color=colours[i], label=name)
        left += width
    ax.axvline(TARGET_S, color="black", linestyle="--", label=f"target {TARGET_S:.0f} s")
    ax.set_yticks([])
    ax.set_xlabel("seconds after `serve run` (medians)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    return fig


if __name__ == "__main__":
    main()
