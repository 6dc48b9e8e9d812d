"""Memory, measured where it matters: each DAG stage's replica against the components it holds,
and against one deployment that holds the whole model.

    python -m bench.bench_memory [--families sd15,sdxl] [--formats folder,file] [--size 256] [--steps 4] [--no-baseline]
                                 [--repeats 3] [--no-record]

Full-size SD1.5 and SDXL base with random weights (``bench.full_size``: built from the bundled
configs, cached in bench/out/models/ as a diffusers folder and as a single file, fp16 on disk),
served on this machine's CPUs (fp32, as the service runs on a CPU). For each family and format,
``--repeats`` times, each in a fresh local Ray so that nothing carries over:

1. the DAG (``deployments.app:build_app``, one replica per stage) answers one ``POST
   /v1/generate`` (SIZExSIZE, STEPS Euler steps, First Block Cache off); then each stage's
   ``stats()`` gives what its replica holds (component tensor bytes), its RSS now and at peak,
   and its RSS before any model was loaded (the bare replica);
2. a one-deployment baseline holding the whole model (``load_model`` with every component, the
   shape of "one replica = the whole pipeline", and what every stage held before stages loaded
   only their own part) answers the same request and reports the same figures.

The figure of merit is a replica's RSS over its bare start per byte of the components it holds
(target <= 1.10). The machine's own used memory (total minus available) is sampled throughout:
the DAG serving full-size SDXL must fit this 24 GB machine.

Prints tables, writes bench/out/memory.png and the "memory: ..." section of bench/RESULTS.md.
No ``from __future__ import annotations``: Serve builds the baseline's HTTP handler.
"""
import argparse
import asyncio
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.full_size import FAMILIES, FORMATS, model_path  # noqa: E402
from bench.local_apps import NO_CACHE, deploy_apps, start_ray  # noqa: E402
from bench.report import Repeated, checked, markdown_table, medians, parse_args, pyplot, spreads  # noqa: E402
from deployments.torch_worker import pin_torch_threads  # noqa: E402
from pipeline.request_params import DenoiseParams  # noqa: E402
from pipeline.generate import generate  # noqa: E402
from pipeline.images import encode_png  # noqa: E402
from pipeline.loading import load_model  # noqa: E402
from pipeline.memory import (IDLE_BEFORE_RELEASE_S, component_bytes, process_memory,  # noqa: E402
                             release_freed_memory)
from tools.local_serve import free_port, wait_http  # noqa: E402

RAY_CPUS = 2
OBJECT_STORE_BYTES = 512 * 1024**2  # small: only prompt embeddings and latents cross it
GUIDANCE = 5.0
PROMPT = "a red circle on a blue background"
STAGES = ("TextEncoder", "Denoiser", "VAEDecoder")
WHOLE = "whole pipeline"
DEPLOY_TIMEOUT_S = 1500.0  # three full-size SDXL loads at once on 2 cores
REQUEST_TIMEOUT_S = 1500.0
CALL_TIMEOUT_S = 120.0
GB = 1e9


# --- the baseline: the whole model in one deployment ---------------------------------------------

@serve.deployment(name="WholeModel", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1)
class WholeModel:
    """One replica = text encoders + UNet + VAE, loaded as a stage loads its part, answering the
    DAG's request body over HTTP (PNG back) so that both are asked alike."""

    def __init__(self, path: str, name: str) -> None:
        pin_torch_threads()
        self.rss_at_start = process_memory()["rss_bytes"]  # the bare replica, as a stage measures it
        self.model = load_model(path, name=name)  # fp32 on the CPU, every component

    async def __call__(self, request: Request) -> Response:
        body = await request.json()
        return Response(await asyncio.to_thread(self._generate, body), media_type="image/png")

    def _generate(self, body: dict[str, Any]) -> bytes:
        params = DenoiseParams(body["width"], body["height"], steps=body["steps"],
                               guidance_scale=body["guidance_scale"], seed=body["seed"])
        png = encode_png(generate(self.model, body["prompt"], params).pixels)
        release_freed_memory()  # as an idle stage does: compare weights, not the last batch
        return png

    def stats(self) -> dict[str, Any]:
        """The same report a stage's ``stats()`` gives."""
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "models": {self.model.name: component_bytes(self.model)},
                "memory": {**process_memory(), "rss_at_start_bytes": self.rss_at_start}}


def build_whole(args: dict[str, Any]) -> serve.Application:
    return WholeModel.bind(args["path"], args["name"])


# --- measuring -----------------------------------------------------------------------------------

@dataclass
class Replica:
    """One replica's report: what it holds and its memory."""

    name: str
    components: dict[str, int]  # component -> tensor bytes
    rss: int
    peak_rss: int
    bare_rss: int

    @classmethod
    def from_stats(cls, name: str, stats: dict[str, Any]) -> "Replica":
        components: dict[str, int] = {}
        for held in stats["models"].values():
            for component, size in held.items():
                components[component] = components.get(component, 0) + size
        memory = stats["memory"]
        return cls(name, components, memory["rss_bytes"], memory["peak_rss_bytes"], memory["rss_at_start_bytes"])

    @property
    def component_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def over_bare(self) -> int:
        return self.rss - self.bare_rss

    @property
    def ratio(self) -> float:
        return self.over_bare / self.component_bytes


@dataclass
class Run:
    """One app serving one model: its replicas, the request's seconds, the machine's peak use."""

    family: str
    model_format: str
    app: str  # "DAG" or WHOLE
    replicas: list[Replica]
    request_s: float
    deploy_s: float
    machine_peak_used: int


class MachineMemory:
    """Samples the machine's used memory (total minus available) in a thread; ``peak`` is the
    most seen since start. Shown live on a progress bar."""

    def __init__(self, bar: tqdm, every_s: float = 0.25, show_every_s: float = 2.0) -> None:
        self.bar, self.every_s, self.show_every_s = bar, every_s, show_every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        shown = 0.0
        while not self._stop.is_set():
            memory = psutil.virtual_memory()
            used = memory.total - memory.available
            self.peak = max(self.peak, used)
            if time.monotonic() - shown >= self.show_every_s:
                self.bar.set_postfix_str(f"machine {used / GB:.1f} GB used, peak {self.peak / GB:.1f}")
                shown = time.monotonic()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MachineMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def request_body(size: int, steps: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "guidance_scale": GUIDANCE,
            "seed": 1}


def serve_and_measure(family: str, model_format: str, app: str, path: Path, size: int, steps: int) -> Run:
    """Deploy ``app`` ("DAG" or WHOLE) serving ``path`` in a fresh Ray, send one request over
    HTTP, read each model-holding replica's stats, shut everything down."""
    name = f"random-{family}"
    port = free_port()
    if app == "DAG":
        application = {"name": "raydiance", "route_prefix": "/", "import_path": "deployments.app:build_app",
                       "args": {"models": {name: str(path)}, "accelerator": "cpu",
                                "request_timeout_s": REQUEST_TIMEOUT_S}}
        url, health = f"http://127.0.0.1:{port}/v1/generate", f"http://127.0.0.1:{port}/healthz"
        body = {**request_body(size, steps), **NO_CACHE}
        stages = STAGES
    else:
        application = {"name": "whole", "route_prefix": "/", "import_path": "bench.bench_memory:build_whole",
                       "args": {"path": str(path), "name": name}}
        url, health = f"http://127.0.0.1:{port}/", None
        body = request_body(size, steps)
        stages = ("WholeModel",)
    steps_done = ["deploy (loads the model)", "request", "stats", "shut down"]
    with tqdm(total=len(steps_done), desc=f"{family} {model_format} {app}", unit="step") as bar, \
            MachineMemory(bar) as machine:
        start_ray(RAY_CPUS, OBJECT_STORE_BYTES)
        try:
            bar.set_description(f"{family} {model_format} {app}: {steps_done[0]}")
            start = time.perf_counter()
            deploy_apps(port, [application], DEPLOY_TIMEOUT_S)
            if health:
                wait_http(health, timeout_s=CALL_TIMEOUT_S)
            deploy_s = time.perf_counter() - start
            bar.update()
            bar.set_description(f"{family} {model_format} {app}: {steps_done[1]}")
            start = time.perf_counter()
            with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
                response = client.post(url, json=body)
            response.raise_for_status()
            if response.headers.get("content-type") != "image/png":
                raise RuntimeError(f"{app}: expected a PNG, got {response.headers.get('content-type')}")
            request_s = time.perf_counter() - start
            bar.update()
            bar.set_description(f"{family} {model_format} {app}: {steps_done[2]}")
            time.sleep(IDLE_BEFORE_RELEASE_S + 1.0)  # an idle replica: freed activations given back
            replicas = [Replica.from_stats(WHOLE if stage == "WholeModel" else stage,
                                           serve.get_deployment_handle(stage, app_name=application["name"])
                                           .stats.remote().result(timeout_s=CALL_TIMEOUT_S))
                        for stage in stages]
            bar.update()
        finally:
            bar.set_description(f"{family} {model_format} {app}: {steps_done[3]}")
            serve.shutdown()
            ray.shutdown()
        bar.update()
    return Run(family, model_format, app, replicas, request_s, deploy_s, machine.peak)


# --- reporting -----------------------------------------------------------------------------------

SHORT = {"text_encoder": "CLIP-L", "text_encoder_2": "bigG", "unet": "UNet", "vae": "VAE"}
TARGET = 1.10  # RSS over bare per byte of the components held


def by_app(runs: list[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """The runs of each (family, format, app), in run order."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.family, run.model_format, run.app), []).append(run)
    return groups


def replica_rows(runs: list[Run]) -> list[tuple]:
    """A row per replica over the runs of its app."""
    rows = []
    for (family, model_format, _), same_app in by_app(runs).items():
        for same in zip(*(run.replicas for run in same_app)):  # one replica, run by run
            first = same[0]
            held = " + ".join(SHORT.get(c, c) for c in first.components)
            rows.append((family, model_format, first.name, held, first.component_bytes / GB,
                         Repeated.of(r.bare_rss / GB for r in same), Repeated.of(r.over_bare / GB for r in same),
                         Repeated.of(r.ratio for r in same), checked([r.ratio <= TARGET for r in same]),
                         Repeated.of(r.peak_rss / GB for r in same),
                         Repeated.of((r.peak_rss - r.bare_rss) / GB for r in same)))
    return rows


def app_rows(runs: list[Run]) -> list[tuple]:
    """Per family and format: the DAG's replicas together vs the whole-pipeline deployment, run
    by run, and what the DAG cost before each stage loaded only its part (each stage ~ the whole
    model)."""
    groups = by_app(runs)
    rows = []
    for (family, model_format, app), dags in groups.items():
        if app != "DAG":
            continue
        wholes = groups.get((family, model_format, WHOLE))

        def whole_figure(value) -> object:
            return "-" if wholes is None else Repeated.of(value(w) for w in wholes)

        rows.append((family, model_format, Repeated.of(sum(r.over_bare for r in d.replicas) / GB for d in dags),
                     whole_figure(lambda w: w.replicas[0].over_bare / GB),
                     whole_figure(lambda w: len(dags[0].replicas) * w.replicas[0].over_bare / GB),
                     Repeated.of(d.machine_peak_used / GB for d in dags),
                     whole_figure(lambda w: w.machine_peak_used / GB),
                     Repeated.of(d.deploy_s for d in dags), Repeated.of(d.request_s for d in dags),
                     whole_figure(lambda w: w.request_s)))
    return rows


def plot(runs: list[Run]):
    plt = pyplot()
    groups = sorted({(r.family, r.model_format) for r in runs},
                    key=lambda g: (FAMILIES.index(g[0]), FORMATS.index(g[1])))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.8), squeeze=False, sharey=False)
    apps = by_app(runs)
    for ax, (family, model_format) in zip(axes[0], groups):
        replicas = [same for (f, m, _), same_app in apps.items() if (f, m) == (family, model_format)
                    for same in zip(*(run.replicas for run in same_app))]  # each replica, run by run
        names = [("whole" if s[0].name == WHOLE else s[0].name.replace("Decoder", "").replace("Encoder", "Enc."))
                 for s in replicas]
        bare = [Repeated.of(r.bare_rss / GB for r in s).median for s in replicas]
        held = [s[0].component_bytes / GB for s in replicas]
        rss = [Repeated.of(r.rss / GB for r in s) for s in replicas]
        rest = [max(total - b - h, 0) for total, b, h in zip(medians(rss), bare, held)]
        ax.bar(names, bare, color="lightgray", label="bare replica")
        ax.bar(names, held, bottom=bare, color="tab:blue", label="component tensors")
        ax.bar(names, rest, bottom=[b + h for b, h in zip(bare, held)], yerr=spreads(rss), capsize=3,
               color="tab:orange", label="RSS beyond them")
        for i, same in enumerate(replicas):  # the figure of merit over each bar
            ax.annotate(f"x{Repeated.of(r.ratio for r in same).median:.2f}", (i, rss[i].high), ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(f"{family}, {model_format}")
        ax.margins(y=0.12)
        ax.tick_params(axis="x", labelrotation=30)
    axes[0][0].set_ylabel("replica RSS after one image (GB, median)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("each stage's replica vs one replica holding the whole model (fp32, CPU); "
                 "x: RSS over bare / component bytes; bars: min-max RSS of the runs")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-baseline", action="store_true", help="the DAG only")
    args, report = parse_args(parser, "bench.bench_memory")
    families, formats = args.families.split(","), args.formats.split(",")

    paths = {(f, m): model_path(f, m) for f in families for m in formats}  # built once, then cached
    apps = ["DAG"] + ([] if args.no_baseline else [WHOLE])
    runs = [serve_and_measure(f, m, app, paths[f, m], args.size, args.steps)
            for _ in range(args.repeats) for f in families for m in formats for app in apps]

    replica_table = markdown_table(
        ["family", "format", "replica", "holds", "component GB", "bare RSS GB", "RSS over bare GB",
         "over bare / components", f"<= {TARGET:.2f}", "peak RSS GB", "peak over bare GB"], replica_rows(runs))
    app_table = markdown_table(
        ["family", "format", "DAG: stages over bare GB", "whole pipeline over bare GB",
         "before: 3 stages x whole GB", "machine peak used, DAG GB", "machine peak used, whole GB",
         "DAG deploy s", "DAG request s", "whole request s"], app_rows(runs))
    total = psutil.virtual_memory().total / GB
    report.record("memory: each stage vs the whole model, full-size SD1.5 and SDXL on CPU",
                  replica_table + "\n\n" + app_table,
                  f"Full-size SD1.5 / SDXL base architectures with random weights (`bench.full_size`, fp16 on "
                  f"disk as a diffusers folder and as one single-file checkpoint), served in fp32 on this "
                  f"{total:.0f} GB machine's CPUs, one replica per stage, each run in a fresh Ray; one "
                  f"{args.size}x{args.size} image, {args.steps} Euler steps, guidance {GUIDANCE}, First Block "
                  f"Cache off, sent over HTTP; each replica's `stats()` is read once it has been idle "
                  "longer than `IDLE_BEFORE_RELEASE_S`, when it has given the memory its forwards freed "
                  "back to the OS (`pipeline.memory.release_freed_memory`; the whole-pipeline baseline "
                  "does the same after its image). "
                  "The Ingress replica holds no model and is not listed. Bare: the replica process before "
                  "it loads any model (Python, torch, diffusers, transformers, Ray), "
                  "`rss_at_start_bytes`; RSS over bare is what loading the model and "
                  "serving one image added. Component GB: the tensor bytes of the components the replica "
                  f"holds (`component_bytes`). Target: RSS over bare <= {TARGET:.2f} x component bytes per stage. "
                  "Peak: the process's high-water RSS (`ru_maxrss`), which includes the load's transient "
                  "(the fp16 file's pages while they are cast to fp32). Whole pipeline: one deployment "
                  "that loads every component (`load_model(path)`) and generates with "
                  "`pipeline.generate.generate`, measured the same way. Before: until stages loaded only "
                  "their own components, each of the three stages loaded the whole model, so each held "
                  "about what the whole-pipeline replica holds; the before column is 3 x that. Machine "
                  "peak used: total minus available memory, sampled every 0.25 s over the whole run "
                  "(deploy, request, shutdown), everything else on the machine included. A run: every "
                  f"family, format and app once, in turn; {args.repeats} runs.")
    report.save_figure(plot(runs), "memory")


if __name__ == "__main__":
    main()
