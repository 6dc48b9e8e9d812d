"""Step-level batching through the HTTP API: engine batching on vs off vs one whole-pipeline app.

    python -m bench.bench_batching [--steps 20] [--concurrency 1,4,16] [--repeats 3] [--no-record]

Images per second at each concurrency, on the built-in model (64x64, Euler, guidance 5), for:

1. the DAG with the Denoiser engine batching steps across requests (``max_batch_rows: 32``),
   First Block Cache off (``cache: {threshold: 0}``): batching alone;
2. the same DAG and requests with the cache at its default: Raydiance as it ships;
3. the DAG with ``max_batch_rows: 1``: one request per UNet forward (no batching across
   requests; a request's own cond/uncond rows still share a forward), cache off;
4. the one-deployment app of the DAG benchmark: diffusers' StableDiffusionPipeline whole in each
   replica, one image at a time per replica (Ray Serve's Stable Diffusion example's shape);
5. serve_config.yaml's application as shipped (its args and its deployments' settings: the
   Denoiser autoscaling from one replica), the cache at its default: what a user runs.

Each app has 2 CPUs of Ray resources on the same 2 cores and they take turns, request wave by
request wave, in ``--repeats`` runs (``--rounds``: its older name); one torch thread per process.
Before the runs every app gets a warm-up burst (3 x the highest concurrency, that many clients),
as a user's service has had traffic before: the shipped app's autoscaler has added its second
Denoiser by then, as it would for a real burst.
Prints a table, writes bench/out/batching.png and the "batching" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from bench.local_apps import (NO_CACHE, RAY_CPUS, app, body, deploy_apps, start_ray, throughput,  # noqa: E402
                              throughput_runs)
from bench.report import Repeated, markdown_table, parse_args, plot_levels, pyplot, ratio  # noqa: E402
from pipeline.unet.cache_config import default_cache_config  # noqa: E402
from tools.local_serve import free_port, wait_http  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402

# series: (app route, extra request fields); the whole-pipeline app ignores the cache field
SERIES = {"engine batching": ("batched", NO_CACHE), "engine batching, cache on": ("batched", {}),
          "max_batch_rows 1": ("unbatched", NO_CACHE), "whole pipeline": ("whole", NO_CACHE),
          "shipped config": ("shipped", {})}
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def dag_app(name: str, max_batch_rows: int) -> dict:
    # Two Denoisers (0.8 CPU each) and the small stages at 0.1: the same 2 CPUs as the baseline.
    return app(name, "deployments.app:build_app",
               {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu",
                "denoiser": {"max_batch_rows": max_batch_rows}},
               [{"name": "Denoiser", "num_replicas": 2, "max_ongoing_requests": 32}])


def shipped_app(name: str) -> dict:
    """serve_config.yaml's application, at /NAME: its args and deployments as they ship."""
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())["applications"][0]
    return {**shipped, "name": name, "route_prefix": f"/{name}"}


# (label, numerator, denominator): the ratios of the table, each taken within a run
RATIOS = (("batching / whole", "engine batching", "whole pipeline"),
          ("batching, cache on / whole", "engine batching, cache on", "whole pipeline"),
          ("batching / rows 1", "engine batching", "max_batch_rows 1"))


def table(rates: dict[str, dict[int, list[float]]], levels: list[int]) -> str:
    return markdown_table(
        ["concurrency", *(f"{label} images/s" for label in SERIES), *(label for label, _, _ in RATIOS)],
        [(c, *(Repeated.of(rates[label][c]) for label in SERIES),
          *(ratio(rates[a][c], rates[b][c]) for _, a, b in RATIOS)) for c in levels])


def scaling_table(rates: dict[str, dict[int, list[float]]], levels: list[int]) -> str:
    """Each series' images/s at every level over its own at one client at a time (target for the
    shipped config: >= 2.5 at 16 clients)."""
    top = [c for c in levels if c > 1]
    return markdown_table(["series", *(f"{c} clients / 1" for c in top)],
                          [(label, *(ratio(rates[label][c], rates[label][1]) for c in top))
                           for label in SERIES])


def warm_up(series: dict[str, tuple[str, dict]], concurrency: int, steps: int) -> None:
    """A burst at ``concurrency`` to every app: caches filled, the autoscaler's replicas added."""
    for label, (url, extra) in series.items():
        throughput(url, concurrency, [body(i, steps, extra) for i in range(3 * concurrency)], [],
                   f"warm-up {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", default="1,4,16")
    args, report = parse_args(parser, "bench.bench_batching", "--rounds")
    levels = [int(c) for c in args.concurrency.split(",")]

    if 1 not in levels:
        parser.error("--concurrency must include 1: the scaling table is against it")
    start_ray(4 * RAY_CPUS)  # four apps
    try:
        base = deploy_apps(free_port(), [
            dag_app("batched", 32), dag_app("unbatched", 1),
            app("whole", "bench.bench_dag:build_whole", {"model_dir": str(MODEL_DIR)}),
            shipped_app("shipped"),
        ], timeout_s=900)
        for route in ("batched", "unbatched", "shipped"):
            wait_http(f"{base}/{route}/healthz")
        series = {label: (f"{base}/{route}/v1/generate", extra) for label, (route, extra) in SERIES.items()}
        warm_up(series, max(levels), args.steps)
        rates = throughput_runs(series, levels, lambda c: max(8, 3 * c), args.steps, args.repeats)
    finally:
        serve.shutdown()
        ray.shutdown()

    report.record("batching: step-level batching through HTTP",
                  table(rates, levels) + "\n\n" + scaling_table(rates, levels),
                  f"tiny-shapes, 64x64, Euler, {args.steps} steps, guidance 5; First Block Cache off except "
                  f"in 'cache on' (the family default: {default_cache_config('sd15')}). "
                  f"Each app has {RAY_CPUS} CPUs of Ray resources on the same 2 cores, used in turn: the "
                  "DAGs as Ingress, TextEncoder, VAEDecoder at 0.1 CPU and 2 Denoisers at 0.8; the whole "
                  "pipeline as 2 replicas of 1 CPU; the shipped config as serve_config.yaml has it (the "
                  "Denoiser autoscaling from 1 to 2 replicas of 0.8 CPU, the cache at its default). "
                  "Targets: engine batching >= 2x the whole-pipeline app at 16 concurrent clients; the "
                  "shipped config at 16 clients >= 2.5x its own one-at-a-time images/s (second table). "
                  "Every app first gets a warm-up burst of 3 x the highest concurrency; then a run sends "
                  "max(8, 3 x concurrency) requests from that many clients to each app in turn, after "
                  f"one warm-up request; {args.repeats} runs.")
    report.save_figure(plot(levels, rates, args.steps), "batching")


def plot(levels: list[int], rates: dict[str, dict[int, list[float]]], steps: int):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colours = ("tab:blue", "tab:green", "tab:orange", "tab:gray", "tab:red")
    plot_levels(ax, levels, {label: ([Repeated.of(rates[label][c]) for c in levels], colour)
                             for label, colour in zip(SERIES, colours)}, "concurrent clients")
    ax.set_title(f"tiny-shapes 64x64, {steps} steps, 2 CPUs per app")
    return fig


if __name__ == "__main__":
    main()
