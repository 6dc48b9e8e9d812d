"""Switching models and LoRAs through the HTTP API, and throughput with requests spread over LoRAs.

    python -m bench.bench_models [--steps 20] [--repeats 4] [--concurrency 8] [--requests 24]

On one local Ray, one app serving a checkpoints folder of single-file copies of the built-in
model and a loras folder of random LoRAs (kohya format, UNet and text-encoder parts), every stage
keeping ONE model per replica so that each switch of model is a load:

1. latency (median) of a warm request, of the first request after a model switch (three stages
   load the checkpoint), of the first request with a LoRA never used before (the TextEncoder and
   the Denoiser load the adapter), and of a request switching between LoRAs already loaded;
2. images/s with ``--concurrency`` clients whose requests are spread over 1, 2 and 4 LoRAs (the
   engine batches only requests with the same LoRA set), and with no LoRA.

First Block Cache off. Prints tables, writes bench/out/models.png and the "models" section of
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.bench_dag import NO_CACHE, app, body, start_ray  # noqa: E402
from bench.report import markdown_table, record, save_figure  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402

SPREADS = (0, 1, 2, 4)  # LoRAs the requests are spread over (0: none)


def make_library(root: Path, models: int, loras: int) -> tuple[Path, Path]:
    from tools.checkpoint_writer import save_checkpoint
    from pipeline.loading import load_model
    from tools.random_models import write_lora_pair

    checkpoints, lora_dir = root / "checkpoints", root / "loras"
    lora_dir.mkdir(parents=True)
    model = load_model(MODEL_DIR)
    for i in tqdm(range(models), desc="checkpoints"):
        save_checkpoint(model, checkpoints / f"tiny-{i}.safetensors")
    for i in tqdm(range(loras), desc="LoRAs"):
        write_lora_pair(model, lora_dir, f"l{i}", seed=i)
    return checkpoints, lora_dir


def timed(client: httpx.Client, url: str, payload: dict) -> float:
    start = time.perf_counter()
    response = client.post(url, json=payload)
    response.raise_for_status()
    return time.perf_counter() - start


def switch_latencies(url: str, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per request for each kind of request, interleaved."""
    times: dict[str, list[float]] = {"warm (same model, no LoRA)": [], "first after a model switch": [],
                                     "first with a new LoRA": [], "switch between loaded LoRAs": [],
                                     "warm (same LoRA)": []}
    with httpx.Client(timeout=600) as client:
        def ask(i: int, **extra) -> float:
            return timed(client, url, body(i, steps, {**NO_CACHE, **extra}))

        ask(0, model="tiny-1")  # round r uses tiny-(r % 2): each round starts with a switch
        for r in tqdm(range(repeats), desc="switches"):
            model = f"tiny-{r % 2}"
            times["first after a model switch"].append(ask(r, model=model))
            times["warm (same model, no LoRA)"].append(ask(r, model=model))
            fresh, other = f"l{2 * r}_kohya", f"l{2 * r + 1}_kohya"
            times["first with a new LoRA"].append(ask(r, model=model, loras=[{"name": fresh}]))
            times["warm (same LoRA)"].append(ask(r, model=model, loras=[{"name": fresh}]))
            ask(r, model=model, loras=[{"name": other}])  # loads the second one
            times["switch between loaded LoRAs"].append(ask(r, model=model, loras=[{"name": fresh}]))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24)
    args = parser.parse_args()

    import ray

    from tools.local_serve import deploy_config, free_port, wait_http

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, loras = make_library(Path(tmp), models=2, loras=2 * args.repeats + 2)
        start_ray(2)
        port = free_port()
        try:
            deploy_config({
                "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
                "applications": [app("models", "deployments.app:build_app", {
                    "models": {}, "checkpoints_dir": str(checkpoints), "loras_dir": str(loras),
                    "default_model": "tiny-0", "accelerator": "cpu", "max_models_per_replica": 1,
                    "max_loras_per_model": 16}, [])]}, timeout_s=600)
            wait_http(f"http://127.0.0.1:{port}/models/healthz")
            url = f"http://127.0.0.1:{port}/models/v1/generate"
            latencies = switch_latencies(url, args.steps, args.repeats)
            rates = {}
            for spread in SPREADS:
                names = [f"l{i}_kohya" for i in range(spread)]
                extra = [{**NO_CACHE, "model": "tiny-0", **({"loras": [{"name": n}]} if n else {})}
                         for n in (names or [None])]
                rates[spread] = spread_throughput(url, args, extra)
        finally:
            serve.shutdown()
            ray.shutdown()

    warm = latencies["warm (same model, no LoRA)"]
    latency_table = markdown_table(["request", "s (median)", "vs warm"],
                                   [(name, value, value / warm) for name, value in latencies.items()])
    throughput_table = markdown_table(
        ["requests spread over", "images/s", "vs no LoRA"],
        [("no LoRA" if s == 0 else f"{s} LoRA{'s' * (s > 1)}", rates[s], rates[s] / rates[0]) for s in SPREADS])
    command = (f"python -m bench.bench_models --steps {args.steps} --repeats {args.repeats} "
               f"--concurrency {args.concurrency} --requests {args.requests}")
    record("models: switching models and LoRAs", command, latency_table + "\n\n" + throughput_table,
           f"tiny-shapes as single-file checkpoints (12 MB), LoRAs of rank 4 on attention and MLP "
           f"layers, 64x64, Euler, {args.steps} steps, First Block Cache off; the app on 2 CPUs, "
           f"one model per stage replica. Latency: median of {args.repeats} rounds. Throughput: "
           f"{args.requests} requests from {args.concurrency} clients, round-robin over the LoRAs.")
    plot(latencies, rates)


def spread_throughput(url: str, args, extras: list[dict]) -> float:
    """Images/s with requests cycling through ``extras`` (one LoRA set each)."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    cycle = itertools.cycle(extras)
    payloads = [body(i, args.steps, next(cycle)) for i in range(args.requests)]
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(args.concurrency) as pool:
        for extra in extras:  # warm: every LoRA loaded before timing
            timed(client, url, body(0, args.steps, extra))
        start = time.perf_counter()
        list(tqdm(pool.map(lambda p: timed(client, url, p), payloads), total=len(payloads),
                  desc=f"{len(extras) if extras[0].get('loras') else 0} LoRAs", leave=False))
        return len(payloads) / (time.perf_counter() - start)


def plot(latencies: dict[str, float], rates: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.barh(list(latencies), list(latencies.values()), color="tab:blue")
    left.invert_yaxis()
    left.set_xlabel("seconds per request (median)")
    left.set_title("switching")
    right.bar([str(s) for s in rates], list(rates.values()), color="tab:orange")
    right.set_xlabel("LoRAs the requests are spread over")
    right.set_ylabel("images per second")
    right.set_title("throughput")
    save_figure(fig, "models")


if __name__ == "__main__":
    main()
