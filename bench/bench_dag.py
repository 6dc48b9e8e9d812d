"""The stage-split DAG against the in-process pipeline and against one whole-pipeline deployment.

    python -m bench.bench_dag [--latency-images 10] [--steps 20] [--concurrency 1,4,16] [--rounds 2]

On the built-in model, 64x64, Euler, guidance 5, on one local Ray (a few minutes on 2 cores):

1. latency at concurrency 1: ``POST /v1/generate`` through the DAG vs ``pipeline.generate`` in
   this process, interleaved image by image so that machine noise hits both alike: the ratio is
   the DAG's overhead (three hops, HTTP, batching waits);
2. throughput (images/s) at each concurrency: the DAG vs a one-deployment app that runs
   diffusers' StableDiffusionPipeline whole in each replica (the shape of Ray Serve's Stable
   Diffusion example), with the same CPU budget: 2 CPUs of Ray resources each, one torch thread
   per replica, one image at a time per UNet-holding replica. Both stay deployed and take turns.

Prints tables, writes bench/out/dag.png and the "DAG" section of bench/RESULTS.md.
No ``from __future__ import annotations``: Serve resolves the baseline's route annotations.
"""
import argparse
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.report import markdown_table, record, save_figure  # noqa: E402
from pipeline.denoise import DenoiseParams  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402
from tools.tiny_shapes.world import TRAIN_SCENES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY_CPUS = 2
GUIDANCE = 5.0

# --- the baseline: diffusers' whole pipeline in one deployment ----------------------------------

whole_api = FastAPI()


@serve.deployment(name="WholePipeline", num_replicas=2, ray_actor_options={"num_cpus": 1},
                  max_ongoing_requests=16)
@serve.ingress(whole_api)
class WholePipeline:
    """One replica = CLIP + UNet + VAE, as in Ray Serve's Stable Diffusion example."""

    def __init__(self, model_dir: str) -> None:
        from diffusers import StableDiffusionPipeline

        from pipeline.images import encode_png
        from pipeline.samplers import make_scheduler

        torch.set_num_threads(1)
        self.pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
        self.pipe.scheduler = make_scheduler("Euler", dict(self.pipe.scheduler.config))
        self.pipe.set_progress_bar_config(disable=True)
        self.encode_png = encode_png
        self.lock = threading.Lock()  # one image at a time: the replica has one core

    @whole_api.post("/v1/generate")
    def generate(self, body: dict) -> Response:
        with self.lock:
            image = self.pipe(body["prompt"], num_inference_steps=body["steps"], guidance_scale=GUIDANCE,
                              generator=torch.Generator().manual_seed(body["seed"])).images[0]
        return Response(self.encode_png(image), media_type="image/png")


def build_whole(args: dict) -> serve.Application:
    return WholePipeline.bind(args["model_dir"])


# --- measuring -----------------------------------------------------------------------------------

# First Block Cache off: the benchmarks compare the same computation (the baseline has no cache;
# bench_cache measures the cache).
NO_CACHE = {"cache": {"threshold": 0}}


def body(i: int, steps: int, extra: dict | None = None) -> dict:
    return {"prompt": TRAIN_SCENES[i % len(TRAIN_SCENES)].prompt, "seed": i, "steps": steps,
            "guidance_scale": GUIDANCE, **(extra or {})}


def post(client: httpx.Client, url: str, payload: dict) -> None:
    response = client.post(url, json=payload)
    response.raise_for_status()


def throughput(url: str, concurrency: int, requests: int, steps: int, label: str,
               extra: dict | None = None) -> float:
    """Images per second with ``concurrency`` requests in flight, ``requests`` in all.

    ``extra``: more body fields for Raydiance's API (the whole-pipeline baseline ignores them).
    """
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(concurrency) as pool:
        post(client, url, body(0, steps, extra))  # warm
        bar = tqdm(total=requests, desc=f"{label} c={concurrency}", leave=False)
        start = time.perf_counter()
        futures = [pool.submit(post, client, url, body(i, steps, extra)) for i in range(requests)]
        for future in futures:
            future.result()
            bar.update()
        elapsed = time.perf_counter() - start
        bar.close()
    return requests / elapsed


def latency(urls: dict[str, str], images: int, steps: int) -> dict[str, float]:
    """Median seconds per image at concurrency 1: in-process and each app over HTTP, interleaved."""
    from pipeline.generate import generate
    from pipeline.loading import load_model

    torch.set_num_threads(1)
    model = load_model(MODEL_DIR)
    times: dict[str, list[float]] = {"in-process": [], **{name: [] for name in urls}}
    with httpx.Client(timeout=600) as client:
        for i in tqdm(range(images + 1), desc="latency, concurrency 1"):
            payload = body(i, steps, NO_CACHE)
            params = DenoiseParams(64, 64, steps=steps, guidance_scale=GUIDANCE, seed=i)
            start = time.perf_counter()
            generate(model, payload["prompt"], params)
            seconds = {"in-process": time.perf_counter() - start}
            for name, url in urls.items():
                start = time.perf_counter()
                post(client, url, payload)
                seconds[name] = time.perf_counter() - start
            if i:  # the first of each warms caches
                for name, value in seconds.items():
                    times[name].append(value)
    return {name: statistics.median(values) for name, values in times.items()}


def start_ray(num_cpus: int) -> None:
    """A local Ray for a benchmark's apps; replicas import bench/ and deployments/ whether or
    not the project is pip-installed."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def app(name: str, import_path: str, args: dict, deployments: list[dict]) -> dict:
    return {"name": name, "route_prefix": f"/{name}", "import_path": import_path, "args": args,
            "deployments": deployments}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-images", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per app and level")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray

    from tools.local_serve import deploy_config, free_port, wait_http

    # Both apps stay deployed, each with RAY_CPUS of Ray resources, and take turns, so that
    # whatever else the machine does hits both alike; the idle one costs next to nothing.
    start_ray(2 * RAY_CPUS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    urls = {"DAG": f"{base}/dag/v1/generate", "whole pipeline": f"{base}/whole/v1/generate"}
    results: dict[str, dict[int, list[float]]] = {name: {c: [] for c in levels} for name in urls}
    try:
        deploy_config({
            "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [
                # The DAG in 2 CPUs: two Denoisers (0.8 each), the small stages 0.1 each.
                app("dag", "deployments.app:build_app",
                    {"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu"},
                    [{"name": "Denoiser", "num_replicas": 2}]),
                app("whole", "bench.bench_dag:build_whole", {"model_dir": str(MODEL_DIR)}, []),
            ]}, timeout_s=600)  # replicas start slowly on busy cores
        wait_http(f"{base}/dag/healthz")
        medians = latency(urls, args.latency_images, args.steps)
        for _ in range(args.rounds):
            for c in levels:
                for name, url in urls.items():
                    results[name][c].append(throughput(url, c, max(8, 2 * c), args.steps, name,
                                                       extra=NO_CACHE))
    finally:
        serve.shutdown()
        ray.shutdown()

    ratio = medians["DAG"] / medians["in-process"]
    rates = {name: {c: statistics.mean(v) for c, v in by_level.items()} for name, by_level in results.items()}
    latency_table = markdown_table(
        ["concurrency 1", "s/image (median)", "vs in-process"],
        [(name, value, value / medians["in-process"]) for name, value in medians.items()])
    throughput_table = markdown_table(
        ["concurrency", "DAG images/s", "whole-pipeline deployment images/s", "DAG / whole"],
        [(c, rates["DAG"][c], rates["whole pipeline"][c], rates["DAG"][c] / rates["whole pipeline"][c])
         for c in levels])
    command = (f"python -m bench.bench_dag --latency-images {args.latency_images} --steps {args.steps} "
               f"--concurrency {args.concurrency} --rounds {args.rounds}")
    record("DAG: latency and throughput", command, latency_table + "\n\n" + throughput_table,
           f"tiny-shapes, 64x64, Euler, {args.steps} steps, guidance 5. DAG latency / in-process: "
           f"{ratio:.2f}x (target <= 1.10x). Each app has {RAY_CPUS} CPUs of Ray resources on the "
           "same 2 cores, used in turn: the DAG as Ingress, TextEncoder, VAEDecoder at 0.1 CPU and "
           "2 Denoisers at 0.8; the whole pipeline (diffusers' StableDiffusionPipeline) as 2 "
           "replicas of 1 CPU, one image at a time each. One torch thread per process. "
           f"Throughput: mean of {args.rounds} runs of max(8, 2 x concurrency) requests.")
    plot(levels, rates, medians, args.steps)


def plot(levels: list[int], rates: dict, medians: dict[str, float], steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.bar(list(medians), list(medians.values()), color=["tab:green", "tab:blue", "tab:gray"])
    left.set_ylabel("seconds per image")
    left.set_title("latency, concurrency 1")
    for key, colour in (("DAG", "tab:blue"), ("whole pipeline", "tab:gray")):
        right.plot(levels, [rates[key][c] for c in levels], marker="o", label=key, color=colour)
    right.set_xscale("log", base=2)
    right.set_xticks(levels, [str(c) for c in levels])
    right.set_xlabel("concurrent requests")
    right.set_ylabel("images per second")
    right.set_title("throughput, 2 CPUs")
    right.legend()
    fig.suptitle(f"tiny-shapes 64x64, {steps} steps")
    save_figure(fig, "dag")


if __name__ == "__main__":
    main()
