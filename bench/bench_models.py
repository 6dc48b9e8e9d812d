"""Switching models and LoRAs through the HTTP API, and throughput with requests spread over LoRAs.

    python -m bench.bench_models [--steps 20] [--concurrency 8] [--requests 24] [--repeats 3] [--no-record]

On one local Ray, one app serving a checkpoints folder of single-file copies of the built-in
model and a loras folder of random LoRAs (kohya format, UNet and text-encoder parts), every stage
keeping ONE model per replica so that each switch of model is a load:

1. latency of a warm request, of the first request after a model switch (three stages
   load the checkpoint), of the first request with a LoRA never used before (the TextEncoder and
   the Denoiser load the adapter), and of a request switching between LoRAs already loaded;
2. images/s with ``--concurrency`` clients whose requests are spread over 1, 2 and 4 LoRAs (the
   engine batches only requests with the same LoRA set), and with no LoRA.

Each figure from ``--repeats`` runs; First Block Cache off. Prints tables, writes
bench/out/models.png and the "models" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.local_apps import NO_CACHE, app, body, deploy_apps, post, start_ray, throughput  # noqa: E402
from bench.report import Repeated, markdown_table, medians, parse_args, pyplot, ratio, spreads  # noqa: E402
from pipeline.loading import load_model  # noqa: E402
from tools.checkpoint_writer import save_checkpoint  # noqa: E402
from tools.local_serve import free_port, wait_http  # noqa: E402
from tools.random_models import write_lora_pair  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402

SPREADS = (0, 1, 2, 4)  # LoRAs the requests are spread over (0: none)


def make_library(root: Path, models: int, loras: int) -> tuple[Path, Path]:
    checkpoints, lora_dir = root / "checkpoints", root / "loras"
    lora_dir.mkdir(parents=True)
    model = load_model(MODEL_DIR)
    for i in tqdm(range(models), desc="checkpoints"):
        save_checkpoint(model, checkpoints / f"tiny-{i}.safetensors")
    for i in tqdm(range(loras), desc="LoRAs"):
        write_lora_pair(model, lora_dir, f"l{i}", seed=i)
    return checkpoints, lora_dir


WARM = "warm (same model, no LoRA)"


def switch_latencies(url: str, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each kind of request, once per run; each run starts with a model switch."""
    times: dict[str, list[float]] = {WARM: [], "first after a model switch": [], "first with a new LoRA": [],
                                     "switch between loaded LoRAs": [], "warm (same LoRA)": []}
    with httpx.Client(timeout=600) as client:
        def ask(i: int, **extra) -> float:
            return post(client, url, body(i, steps, {**NO_CACHE, **extra}))

        ask(0, model="tiny-1")  # run r uses tiny-(r % 2): each run starts with a switch
        for r in tqdm(range(repeats), desc="switch runs"):
            model = f"tiny-{r % 2}"
            times["first after a model switch"].append(ask(r, model=model))
            times[WARM].append(ask(r, model=model))
            fresh, other = f"l{2 * r}_kohya", f"l{2 * r + 1}_kohya"
            times["first with a new LoRA"].append(ask(r, model=model, loras=[{"name": fresh}]))
            times["warm (same LoRA)"].append(ask(r, model=model, loras=[{"name": fresh}]))
            ask(r, model=model, loras=[{"name": other}])  # loads the second one
            times["switch between loaded LoRAs"].append(ask(r, model=model, loras=[{"name": fresh}]))
    return times


def spread_rates(url: str, steps: int, concurrency: int, requests: int, repeats: int) -> dict[int, list[float]]:
    """Images/s with requests cycling through 0 (no LoRA), 1, 2, 4 LoRAs, once per run, the
    spreads in turn within a run; every LoRA of a spread is loaded before its timing."""
    rates: dict[int, list[float]] = {spread: [] for spread in SPREADS}
    for _ in tqdm(range(repeats), desc="throughput runs"):
        for spread in SPREADS:
            extras = [{**NO_CACHE, "model": "tiny-0", **({"loras": [{"name": f"l{i}_kohya"}]} if spread else {})}
                      for i in range(max(spread, 1))]
            cycle = itertools.cycle(extras)
            payloads = [body(i, steps, next(cycle)) for i in range(requests)]
            rates[spread].append(throughput(url, concurrency, payloads, [body(0, steps, e) for e in extras],
                                            f"{spread} LoRAs"))
    return rates


def tables(latencies: dict[str, list[float]], rates: dict[int, list[float]]) -> str:
    latency_table = markdown_table(
        ["request", "s", "vs warm"],
        [(name, Repeated.of(values), "reference" if name == WARM else ratio(values, latencies[WARM]))
         for name, values in latencies.items()])
    throughput_table = markdown_table(
        ["requests spread over", "images/s", "vs no LoRA"],
        [(spread_label(s), Repeated.of(rates[s]), "reference" if s == 0 else ratio(rates[s], rates[0]))
         for s in SPREADS])
    return latency_table + "\n\n" + throughput_table


def spread_label(spread: int) -> str:
    return "no LoRA" if spread == 0 else f"{spread} LoRA{'s' * (spread > 1)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="requests per throughput run")
    args, report = parse_args(parser, "bench.bench_models")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, loras = make_library(Path(tmp), models=2, loras=2 * args.repeats + 2)
        start_ray(2)
        try:
            base = deploy_apps(free_port(), [app("models", "deployments.app:build_app", {
                "models": {}, "checkpoints_dir": str(checkpoints), "loras_dir": str(loras),
                "default_model": "tiny-0", "accelerator": "cpu", "max_models_per_replica": 1,
                "max_loras_per_model": 16})], timeout_s=600)
            wait_http(f"{base}/models/healthz")
            url = f"{base}/models/v1/generate"
            latencies = switch_latencies(url, args.steps, args.repeats)
            rates = spread_rates(url, args.steps, args.concurrency, args.requests, args.repeats)
        finally:
            serve.shutdown()
            ray.shutdown()

    report.record("models: switching models and LoRAs", tables(latencies, rates),
                  f"tiny-shapes as single-file checkpoints (12 MB), LoRAs of rank 4 on attention and MLP "
                  f"layers, 64x64, Euler, {args.steps} steps, First Block Cache off; the app on 2 CPUs, "
                  "one model per stage replica. Latency: a run sends each kind of request once, one at "
                  "a time, starting with a switch of model and a LoRA never used before. Throughput: a "
                  f"run sends {args.requests} requests from {args.concurrency} clients, round-robin over "
                  f"the LoRAs, each spread in turn, after one warm-up request per LoRA. {args.repeats} runs.")
    report.save_figure(plot(latencies, rates), "models")


def plot(latencies: dict[str, list[float]], rates: dict[int, list[float]]):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    seconds = [Repeated.of(values) for values in latencies.values()]
    left.barh(list(latencies), medians(seconds), xerr=spreads(seconds), capsize=3, color="tab:blue")
    left.invert_yaxis()
    left.set_xlabel("seconds per request (median, min-max)")
    left.set_title("switching")
    figures = [Repeated.of(rates[s]) for s in SPREADS]
    right.bar([str(s) for s in SPREADS], medians(figures), yerr=spreads(figures), capsize=4, color="tab:orange")
    right.set_xlabel("LoRAs the requests are spread over")
    right.set_ylabel("images per second (median, min-max)")
    right.set_title("throughput")
    return fig


if __name__ == "__main__":
    main()
