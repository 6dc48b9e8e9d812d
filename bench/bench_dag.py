"""The stage-split DAG against the in-process pipeline and against one whole-pipeline deployment.

    python -m bench.bench_dag [--latency-images 10] [--steps 20] [--concurrency 1,4,16] [--repeats 3] [--no-record]

On the built-in model, 64x64, Euler, guidance 5, on one local Ray (about 8 minutes on 2 cores at
the defaults):

1. latency at concurrency 1: ``POST /v1/generate`` through the DAG vs ``pipeline.generate`` in
   this process, interleaved image by image so that machine noise hits both alike: the ratio is
   the DAG's overhead (three hops, HTTP, batching waits);
2. throughput (images/s) at each concurrency: the DAG vs a one-deployment app that runs
   diffusers' StableDiffusionPipeline whole in each replica (the shape of Ray Serve's Stable
   Diffusion example), with the same CPU budget: 2 CPUs of Ray resources each, one torch thread
   per replica, one image at a time per UNet-holding replica. Both stay deployed and take turns.

Each figure: ``--repeats`` runs (``--rounds`` is its older name), median and min-max.

Prints tables, writes bench/out/dag.png and the "DAG" section of bench/RESULTS.md.
No ``from __future__ import annotations``: Serve resolves the baseline's route annotations.
"""
import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.local_apps import (GUIDANCE, NO_CACHE, RAY_CPUS, app, body, deploy_apps, post,  # noqa: E402
                              start_ray, throughput_runs)
from bench.report import (Repeated, markdown_table, medians, parse_args, plot_levels, pyplot,  # noqa: E402
                          ratio, spreads)
from pipeline.request_params import DenoiseParams  # noqa: E402
from pipeline.generate import generate  # noqa: E402
from pipeline.images import encode_png  # noqa: E402
from pipeline.loading import load_model  # noqa: E402
from pipeline.samplers import make_scheduler  # noqa: E402
from tools.local_serve import free_port, wait_http  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402

IN_PROCESS, DAG, WHOLE = "in-process", "DAG", "whole pipeline"

# --- the baseline: diffusers' whole pipeline in one deployment ----------------------------------

whole_api = FastAPI()


@serve.deployment(name="WholePipeline", num_replicas=2, ray_actor_options={"num_cpus": 1},
                  max_ongoing_requests=16)
@serve.ingress(whole_api)
class WholePipeline:
    """One replica = CLIP + UNet + VAE, as in Ray Serve's Stable Diffusion example."""

    def __init__(self, model_dir: str) -> None:
        torch.set_num_threads(1)
        self.pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
        self.pipe.scheduler = make_scheduler("Euler", dict(self.pipe.scheduler.config))
        self.pipe.set_progress_bar_config(disable=True)
        self.lock = threading.Lock()  # one image at a time: the replica has one core

    @whole_api.post("/v1/generate")
    def generate(self, payload: dict) -> Response:
        with self.lock:
            image = self.pipe(payload["prompt"], num_inference_steps=payload["steps"], guidance_scale=GUIDANCE,
                              generator=torch.Generator().manual_seed(payload["seed"])).images[0]
        return Response(encode_png(image), media_type="image/png")


def build_whole(args: dict) -> serve.Application:
    return WholePipeline.bind(args["model_dir"])


# --- measuring -----------------------------------------------------------------------------------

# Where a DAG request's time goes, from its ``server-timing`` (the Ingress's own clock for
# ``total``, each stage's for its part) and the client's clock; seconds.
PARTS = ("proxy and HTTP", "hops and serialization", "queued before the engine", "text encoder",
         "denoise", "VAE decode")


def breakdown(client_s: float, server_timing: str) -> dict[str, float]:
    """A DAG response's seconds by part: outside the Ingress (Ray's proxy, HTTP, the client),
    the Ingress to the stages and back beyond their own work (three handle calls, pickling,
    batching waits), the engine's queue, and each stage's own work."""
    ms = {k: float(v) for k, v in (entry.split(";dur=") for entry in server_timing.split(", "))}
    stages = ms["encode"] + ms["queue"] + ms["denoise"] + ms["decode"]
    parts = (client_s * 1000 - ms["total"], ms["total"] - stages, ms["queue"], ms["encode"],
             ms["denoise"], ms["decode"])
    return {name: value / 1000 for name, value in zip(PARTS, parts)}


def timed_dag(client: httpx.Client, url: str, payload: dict) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    response = client.post(url, json=payload)
    seconds = time.perf_counter() - start
    response.raise_for_status()
    return seconds, breakdown(seconds, response.headers["server-timing"])


def latency(urls: dict[str, str], images: int, steps: int,
            repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per run, the median seconds per image at concurrency 1 of the pipeline in this process and
    of each app over HTTP, sent in turn image by image (same prompt and seed), and the DAG's
    median of each part (``PARTS``); the first image of each run warms caches and is not counted."""
    torch.set_num_threads(1)
    model = load_model(MODEL_DIR)
    runs: dict[str, list[float]] = {IN_PROCESS: [], **{name: [] for name in urls}}
    part_runs: dict[str, list[float]] = {name: [] for name in PARTS}
    with httpx.Client(timeout=600) as client:
        for _ in tqdm(range(repeats), desc="latency runs, concurrency 1"):
            times: dict[str, list[float]] = {name: [] for name in runs}
            parts: dict[str, list[float]] = {name: [] for name in PARTS}
            for i in range(images + 1):
                payload = body(i, steps, NO_CACHE)
                params = DenoiseParams(64, 64, steps=steps, guidance_scale=GUIDANCE, seed=i)
                start = time.perf_counter()
                generate(model, payload["prompt"], params)
                seconds = {IN_PROCESS: time.perf_counter() - start}
                seconds[DAG], dag_parts = timed_dag(client, urls[DAG], payload)
                seconds.update({name: post(client, url, payload) for name, url in urls.items()
                                if name != DAG})
                if i:
                    for name, value in seconds.items():
                        times[name].append(value)
                    for name, value in dag_parts.items():
                        parts[name].append(value)
            for name, values in times.items():
                runs[name].append(statistics.median(values))
            for name, values in parts.items():
                part_runs[name].append(statistics.median(values))
    return runs, part_runs


def parts_table(parts: dict[str, list[float]]) -> str:
    return markdown_table(["a DAG request at concurrency 1", "ms (median of the runs' medians)"],
                          [(name, Repeated.of([v * 1000 for v in values])) for name, values in parts.items()])


def tables(latencies: dict[str, list[float]], rates: dict[str, dict[int, list[float]]]) -> str:
    base = latencies[IN_PROCESS]
    latency_table = markdown_table(
        ["concurrency 1", "s/image", "vs in-process"],
        [(name, Repeated.of(values), "reference" if name == IN_PROCESS else ratio(values, base))
         for name, values in latencies.items()])
    throughput_table = markdown_table(
        ["concurrency", "DAG images/s", "whole-pipeline deployment images/s", "DAG / whole"],
        [(c, Repeated.of(rates[DAG][c]), Repeated.of(rates[WHOLE][c]), ratio(rates[DAG][c], rates[WHOLE][c]))
         for c in rates[DAG]])
    return latency_table + "\n\n" + throughput_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-images", type=int, default=10, help="timed images per latency run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", default="1,4,16")
    args, report = parse_args(parser, "bench.bench_dag", "--rounds")
    levels = [int(c) for c in args.concurrency.split(",")]

    # Both apps stay deployed, each with RAY_CPUS of Ray resources, and take turns, so that
    # whatever else the machine does hits both alike; the idle one costs next to nothing.
    start_ray(2 * RAY_CPUS)
    try:
        base = deploy_apps(free_port(), [
            # The DAG in 2 CPUs: two Denoisers (0.8 each), the small stages 0.1 each.
            app("dag", "deployments.app:build_app", {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu"},
                [{"name": "Denoiser", "num_replicas": 2}]),
            app("whole", "bench.bench_dag:build_whole", {"model_dir": str(MODEL_DIR)}),
        ], timeout_s=600)  # replicas start slowly on busy cores
        urls = {DAG: f"{base}/dag/v1/generate", WHOLE: f"{base}/whole/v1/generate"}
        wait_http(f"{base}/dag/healthz")
        latencies, parts = latency(urls, args.latency_images, args.steps, args.repeats)
        rates = throughput_runs({name: (url, NO_CACHE) for name, url in urls.items()}, levels,
                                lambda c: max(8, 2 * c), args.steps, args.repeats)
    finally:
        serve.shutdown()
        ray.shutdown()

    report.record("DAG: latency and throughput", tables(latencies, rates) + "\n\n" + parts_table(parts),
                  f"tiny-shapes, 64x64, Euler, {args.steps} steps, guidance 5, First Block Cache off. "
                  f"Target: DAG latency / in-process <= 1.10. Each app has {RAY_CPUS} CPUs of Ray "
                  "resources on the same 2 cores, used in turn: the DAG as Ingress, TextEncoder, "
                  "VAEDecoder at 0.1 CPU and 2 Denoisers at 0.8; the whole pipeline (diffusers' "
                  "StableDiffusionPipeline) as 2 replicas of 1 CPU, one image at a time each. One torch "
                  f"thread per process. Latency: a run sends {args.latency_images} images one at a time, "
                  "each through the three in turn (same prompt and seed), after one that warms caches; "
                  "its figure is the median over its images. Throughput: a run sends max(8, 2 x "
                  "concurrency) requests from that many clients to each app in turn, after one warm-up "
                  "request. The parts of a DAG request come from its server-timing header (each stage's "
                  "own clock, the Ingress's for the total) and the client's clock: the proxy and HTTP "
                  "are the client's time beyond the Ingress's, the hops what the Ingress waited beyond "
                  f"the stages' own work. {args.repeats} runs of each.")
    report.save_figure(plot(levels, rates, latencies, args.steps), "dag")


def plot(levels: list[int], rates: dict[str, dict[int, list[float]]], latencies: dict[str, list[float]],
         steps: int):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    seconds = [Repeated.of(values) for values in latencies.values()]
    left.bar(list(latencies), medians(seconds), yerr=spreads(seconds), capsize=4,
             color=["tab:green", "tab:blue", "tab:gray"])
    left.set_ylabel("seconds per image")
    left.set_title("latency, concurrency 1")
    plot_levels(right, levels, {key: ([Repeated.of(rates[key][c]) for c in levels], colour)
                                for key, colour in ((DAG, "tab:blue"), (WHOLE, "tab:gray"))}, "concurrent requests")
    right.set_title("throughput, 2 CPUs")
    fig.suptitle(f"tiny-shapes 64x64, {steps} steps; median and min-max of the runs")
    return fig


if __name__ == "__main__":
    main()
