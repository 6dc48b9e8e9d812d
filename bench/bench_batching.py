"""Step-level batching through the HTTP API: engine batching on vs off vs one whole-pipeline app.

    python -m bench.bench_batching [--steps 20] [--concurrency 1,4,16] [--rounds 2]

Images per second at each concurrency, on the built-in model (64x64, Euler, guidance 5), for:

1. the DAG with the Denoiser engine batching steps across requests (``max_batch_rows: 32``),
   First Block Cache off (``cache: {threshold: 0}``): batching alone;
2. the same DAG and requests with the cache at its default: Raydiance as it ships;
3. the DAG with ``max_batch_rows: 1``: one request per UNet forward (no batching across
   requests; a request's own cond/uncond rows still share a forward), cache off;
4. the one-deployment app of the DAG benchmark: diffusers' StableDiffusionPipeline whole in each
   replica, one image at a time per replica (Ray Serve's Stable Diffusion example's shape).

Each app has 2 CPUs of Ray resources on the same 2 cores and they take turns, request wave by
request wave; one torch thread per process. Prints a table, writes bench/out/batching.png and
the "batching" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ray import serve  # noqa: E402

from bench.bench_dag import NO_CACHE, RAY_CPUS, app, start_ray, throughput  # noqa: E402
from bench.report import markdown_table, record, save_figure  # noqa: E402
from pipeline.unet.cache_config import default_cache_config  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402

# series: (app route, extra request fields); the whole-pipeline app ignores the cache field
SERIES = {"engine batching": ("batched", NO_CACHE), "engine batching, cache on": ("batched", {}),
          "max_batch_rows 1": ("unbatched", NO_CACHE), "whole pipeline": ("whole", NO_CACHE)}


def dag_app(name: str, max_batch_rows: int) -> dict:
    # Two Denoisers (0.8 CPU each) and the small stages at 0.1: the same 2 CPUs as the baseline.
    return app(name, "deployments.app:build_app",
               {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu",
                "denoiser": {"max_batch_rows": max_batch_rows}},
               [{"name": "Denoiser", "num_replicas": 2, "max_ongoing_requests": 32}])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2, help="runs per app and level")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray

    from tools.local_serve import deploy_config, free_port, wait_http

    start_ray(3 * RAY_CPUS)  # three apps
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    results: dict[str, dict[int, list[float]]] = {label: {c: [] for c in levels} for label in SERIES}
    try:
        deploy_config({
            "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [
                dag_app("batched", 32), dag_app("unbatched", 1),
                app("whole", "bench.bench_dag:build_whole", {"model_dir": str(MODEL_DIR)}, []),
            ]}, timeout_s=900)
        for route in ("batched", "unbatched"):
            wait_http(f"{base}/{route}/healthz")
        for _ in range(args.rounds):
            for c in levels:
                for label, (route, extra) in SERIES.items():
                    results[label][c].append(throughput(f"{base}/{route}/v1/generate", c, max(8, 3 * c),
                                                        args.steps, label, extra=extra))
    finally:
        serve.shutdown()
        ray.shutdown()

    rates = {label: {c: statistics.mean(v) for c, v in by_level.items()} for label, by_level in results.items()}
    table = markdown_table(
        ["concurrency", *(f"{label} images/s" for label in SERIES), "batching / whole",
         "batching, cache on / whole", "batching / rows 1"],
        [(c, *(rates[label][c] for label in SERIES),
          rates["engine batching"][c] / rates["whole pipeline"][c],
          rates["engine batching, cache on"][c] / rates["whole pipeline"][c],
          rates["engine batching"][c] / rates["max_batch_rows 1"][c]) for c in levels])
    command = f"python -m bench.bench_batching --steps {args.steps} --concurrency {args.concurrency} --rounds {args.rounds}"
    record("batching: step-level batching through HTTP", command, table,
           f"tiny-shapes, 64x64, Euler, {args.steps} steps, guidance 5; First Block Cache off except "
           f"in 'cache on' (the family default: {default_cache_config('sd15')}). "
           f"Each app has {RAY_CPUS} CPUs of Ray resources on the same 2 cores, used in turn: the "
           "DAGs as Ingress, TextEncoder, VAEDecoder at 0.1 CPU and 2 Denoisers at 0.8; the whole "
           "pipeline as 2 replicas of 1 CPU. Target: engine batching >= 2x the whole-pipeline app "
           f"at 16 concurrent clients. Mean of {args.rounds} runs of max(8, 3 x concurrency) requests.")
    plot(levels, rates, args.steps)


def plot(levels: list[int], rates: dict, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, colour in zip(SERIES, ("tab:blue", "tab:green", "tab:orange", "tab:gray")):
        ax.plot(levels, [rates[label][c] for c in levels], marker="o", label=label, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images per second")
    ax.set_title(f"tiny-shapes 64x64, {steps} steps, 2 CPUs per app")
    ax.legend()
    save_figure(fig, "batching")


if __name__ == "__main__":
    main()
