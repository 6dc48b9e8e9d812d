"""Jobs: time from submit to the first denoising step, and to the finished image, at 1 and 16
jobs submitted at once.

    python -m bench.bench_jobs [--steps 20] [--concurrency 1,16] [--repeats 3] [--no-record]

The app is serve_config.yaml's (the built-in model, its jobs settings: 16 jobs in the Denoisers
at once); each job's events stream (``/v1/jobs/{id}/events``) is read from the moment its
``POST /v1/jobs`` is sent, and the first ``step`` event and the ``succeeded`` one are timed on
the client. One warm-up job first; ``--repeats`` runs, each sending every level in turn.
Prints a table, writes bench/out/jobs.png and the "jobs" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from tqdm import tqdm

from bench.local_apps import body, deploy_apps, start_ray  # first: it sets Ray's environment
import ray  # noqa: E402
from ray import serve  # noqa: E402

from bench.report import Repeated, markdown_table, medians, parse_args, pyplot, spreads  # noqa: E402
from tools.local_serve import free_port, wait_http  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def shipped_app() -> dict:
    """serve_config.yaml's application, its relative model paths made absolute."""
    application = yaml.safe_load(CONFIG.read_text())["applications"][0]
    models = application["args"]["models"]
    application["args"]["models"] = {name: str(CONFIG.parent / path) for name, path in models.items()}
    return application


def one_job(client: httpx.Client, payload: dict) -> tuple[float, float]:
    """(seconds to the first step event, seconds to succeeded), from the submit."""
    start = time.perf_counter()
    response = client.post("/v1/jobs", json=payload)
    response.raise_for_status()
    first = None
    with client.stream("GET", f"/v1/jobs/{response.json()['id']}/events") as events:
        name = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                if name == "step" and first is None:
                    first = time.perf_counter() - start
                elif name == "succeeded":
                    return first, time.perf_counter() - start
                elif name in ("failed", "cancelled", "error"):
                    raise RuntimeError(f"job ended {name}: {json.loads(line[6:])}")
    raise RuntimeError("the events stream ended early")


def wave(url: str, concurrency: int, steps: int, offset: int) -> list[tuple[float, float]]:
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(concurrency) as pool:
        payloads = [body(offset + i, steps) for i in range(concurrency)]
        return list(pool.map(lambda p: one_job(client, p), payloads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", default="1,16")
    args, report = parse_args(parser, "bench.bench_jobs")
    levels = [int(c) for c in args.concurrency.split(",")]

    start_ray(2)
    figures: dict[int, dict[str, list[float]]] = {c: {"first": [], "first_max": [], "done": []} for c in levels}
    try:
        url = deploy_apps(free_port(), [shipped_app()], timeout_s=600)
        wait_http(f"{url}/healthz")
        wave(url, 1, args.steps, 0)  # warm-up: caches filled, first forwards done
        for run in tqdm(range(args.repeats), desc="runs"):
            for c in levels:
                times = wave(url, c, args.steps, 100 * run + c)
                figures[c]["first"].append(statistics.median(t[0] for t in times))
                figures[c]["first_max"].append(max(t[0] for t in times))
                figures[c]["done"].append(statistics.median(t[1] for t in times))
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = [(c, Repeated.of(figures[c]["first"]), Repeated.of(figures[c]["first_max"]),
             Repeated.of(figures[c]["done"])) for c in levels]
    report.record("jobs: submit to first step", markdown_table(
        ["jobs at once", "submit to first step, s (median job)", "submit to first step, s (last job)",
         "submit to image, s (median job)"], rows),
        f"serve_config.yaml as shipped (the built-in model, 64x64, Euler, {args.steps} steps, guidance "
        "5, cache at its default; jobs.max_running 16), on this machine's 2 cores. Times are the "
        "client's, from sending POST /v1/jobs to the job's first `step` event and to its "
        f"`succeeded` event; each run sends each level's jobs at once, after one warm-up job; "
        f"{args.repeats} runs.")
    report.save_figure(plot(levels, figures), "jobs")


def plot(levels: list[int], figures: dict[int, dict[str, list[float]]]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label, colour in (("first", "to first step (median job)", "tab:blue"),
                               ("first_max", "to first step (last job)", "tab:orange"),
                               ("done", "to image (median job)", "tab:green")):
        values = [Repeated.of(figures[c][key]) for c in levels]
        ax.errorbar(levels, medians(values), yerr=spreads(values), marker="o", capsize=3,
                    label=label, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("jobs submitted at once")
    ax.set_ylabel("seconds (median, min-max)")
    ax.set_title("jobs through serve_config.yaml, 2 cores")
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
