"""The compiled UNet (``compile: true``) against eager, in-process: latency and throughput, with
First Block Cache off and on, compile time cold and from the compile cache.

    python -m bench.bench_compile [--arch builtin|sd15|sdxl] [--size PX] [--steps 25] [--requests 1,8,16]
                                  [--caches off,default,fixed] [--out DIR] [--restart] [--repeats 3] [--no-record]

For each cache setting and each N in ``--requests``, N requests with different seeds are stepped
together, as the engine's runner does when they arrive at once (``run_step`` over the whole
group every step: one UNet forward of 2N rows, each request at its own timestep), once with
the eager UNet and once with the compiled one (``pipeline.unet.compiled``, the parts First Block
Cache runs); N=1 is single-request latency. Cache settings: ``off``; ``default`` (the family's
default First Block Cache: its skip rate is the trained built-in model's only, random weights
skip arbitrarily); ``fixed``: a forced skip pattern, 13 of every 25 steps (the first two always
computed, the skips spread evenly; bench-only, ``ForcedSkips``), which gives the speed at a known
skip rate on random weights. Also measured: one UNet step computed (head, tail, output layers)
and cached (reuse: the head alone) at 2 rows, against the head's FLOP share; compile time with
an empty inductor cache (``--compile-cache``, emptied first), and with ``--restart`` again in a
new process from that cache (what a restarted replica pays).

``builtin``: tiny-shapes with real prompts; ``sd15``/``sdxl``: full-size architectures with random
weights and conditioning (``bench.full_size``). fp16 on CUDA, fp32 on CPU (1 thread). Writes
its "compile: ..." section of bench/RESULTS.md, bench/out/compile-ARCH-DEVICE.png, and with
``--out`` the tables to DIR/compile-ARCH-DEVICE.md (``bench/gpu_suite.sh``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from bench.bench_engine import NATIVE_SIZE, builtin, random_conditioning, random_full_size
from bench.report import Repeated, markdown_table, number, parse_args, pyplot, ratio
from pipeline.conditioning import Conditioning
from pipeline.denoise import Trajectory
from pipeline.request_params import DenoiseParams
from pipeline.device import default_dtype, select_device
from pipeline.engine.runner import run_step
from pipeline.model import DiffusionModel
from pipeline.unet.cache_config import FirstBlockCacheConfig, default_cache_config
from pipeline.unet.cache_state import CacheState
from pipeline.unet.compiled import CompileOptions, compile_unet, recompiles
from pipeline.unet.parts import EAGER
from pipeline.unet.split import run_head, run_out, run_tail

GUIDANCE = 5.0
SIZES = {**NATIVE_SIZE, "tiny-sdxl": 64}
FIXED_SKIPS = (13, 25)  # skipped of steps, the fixed pattern
IMPLS = ("eager", "compiled")
COLOURS = {"off": "tab:gray", "default": "tab:blue", "fixed": "tab:green"}
# the targets, printed beside the figures
TARGETS = {"sdxl": "SDXL 1024 px 30 steps: <= 1.3 s/image compiled cache off, <= 0.75 s/image at the "
                   "default cache's skip rate (fixed 13/25 here); TensorRT on an H100: 1.47 s",
           "sd15": "SD1.5 512 px one request: compiled >= 2x eager images/s"}


# --- a forced skip pattern (bench-only: never part of the product's cache) ------------------------

def fixed_pattern(steps: int, skipped: int = FIXED_SKIPS[0], of: int = FIXED_SKIPS[1]) -> frozenset[int]:
    """Steps to skip: ``skipped/of`` of ``steps`` (rounded), spread evenly after the first two."""
    count = min(round(steps * skipped / of), steps - 2)
    free = steps - 2
    return frozenset(2 + (i * free) // count for i in range(count)) if count else frozenset()


class ForcedSkips(CacheState):
    """A cache state that skips exactly ``skips`` (reuse: the last computed prediction), whatever
    the head says: the cost of a known skip rate, on weights that predict none."""

    def __init__(self, steps: int, skips: frozenset[int]) -> None:
        super().__init__(FirstBlockCacheConfig(threshold=1.0, mode="reuse", max_consecutive_hits=None), steps)
        self.skips = skips

    def may_skip(self) -> bool:
        return bool(self.history) and self.step_index in self.skips

    def hits(self, diff: float) -> bool:  # noqa: ARG002 - the pattern decides, not the diff
        return True


# --- measuring ----------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_group(model: DiffusionModel, conditioning: list[Conditioning], size: int, steps: int,
              cache: str) -> tuple[float, int]:
    """N requests stepped together to the end: (seconds, steps cached over all)."""
    config = default_cache_config(model.family) if cache == "default" else None
    synchronize(model.unet.device)
    start = time.perf_counter()
    group = [Trajectory(model, c, DenoiseParams(size, size, steps=steps, guidance_scale=GUIDANCE, seed=i,
                                                cache=config)) for i, c in enumerate(conditioning)]
    if cache == "fixed":
        skips = fixed_pattern(len(group[0].timesteps))
        for t in group:
            t.cache = ForcedSkips(len(t.timesteps), skips)
    while not group[0].done:
        run_step(group)
    synchronize(model.unet.device)
    return time.perf_counter() - start, sum(sum(t.decisions) for t in group)


@dataclass
class Level:
    impl: str
    cache: str
    n: int
    seconds: list[float]
    cached: int  # steps cached over the N requests (the last run)


def step_costs(model: DiffusionModel, parts, size: int, rows: int = 2, iterations: int = 10) -> tuple[float, float]:
    """Milliseconds of one UNet step at ``rows``: computed (head, tail, output layers) and cached
    (reuse: the head alone), medians over ``iterations``."""
    unet = model.unet
    latent = size // model.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    dtype, device = unet.dtype, unet.device
    sample = torch.randn(rows, unet.config.in_channels, latent, latent, generator=generator).to(device, dtype)
    timestep = torch.full((rows,), 500.0, device=device)
    ehs = random_conditioning(model, 1)[0].prompt_embeds.to(device, dtype).expand(rows, -1, -1).contiguous()
    added = _added(model, rows, size)

    def timed(fn) -> float:
        times = []
        for _ in range(iterations):
            synchronize(device)
            start = time.perf_counter()
            parts.begin_step()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1000

    with torch.inference_mode():
        computed = timed(lambda: parts.out(unet, parts.tail(unet, parts.head(unet, sample, timestep, ehs, added))))
        cached = timed(lambda: parts.head(unet, sample, timestep, ehs, added))
    return computed, cached


def _added(model: DiffusionModel, rows: int, size: int, device=None) -> dict[str, torch.Tensor] | None:
    unet = model.unet
    if model.family != "sdxl":
        return None
    device = device or unet.device
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    dtype = unet.dtype if device != "meta" else torch.float32
    return {"text_embeds": torch.zeros(rows, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype).repeat(rows, 1)}


def head_flop_share(model: DiffusionModel, size: int) -> float:
    """FLOPs of the head over a whole step (head, tail, output layers), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(model.unet.config)
    latent, rows = size // model.vae_scale_factor, 2
    sample = torch.zeros(rows, unet.config.in_channels, latent, latent, device="meta")
    ehs = torch.zeros(rows, 77, unet.config.cross_attention_dim, device="meta")
    timestep = torch.zeros(rows, device="meta")
    counters = []
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            head = run_head(unet, sample, timestep, ehs, _added(model, rows, size, "meta"))
        counters.append(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            run_out(unet, run_tail(unet, head))
        counters.append(counter.get_total_flops())
    return counters[0] / sum(counters)


def compile_model(model: DiffusionModel, size: int, cache_dir: Path, mode: str | None,
                  max_rows: int) -> tuple[DiffusionModel, float]:
    """The model with its UNet compiled and warmed at ``size``: (compiled model, seconds)."""
    latent = size // model.vae_scale_factor
    start = time.perf_counter()
    parts = compile_unet(model.unet, CompileOptions(mode=mode, cache_dir=str(cache_dir), max_rows=max_rows),
                         latent_size=(latent, latent), name=model.name, log=print)
    return DiffusionModel(f"{model.name}-compiled", model.configs, model.loaded, parts), time.perf_counter() - start


def build(args, device, dtype, count: int) -> tuple[DiffusionModel, list[Conditioning]]:
    if args.arch == "builtin":
        return builtin(device, dtype, count)
    if args.arch == "tiny-sdxl":  # SDXL's block layout at tiny widths: the smoke test's SDXL
        from pipeline.loading import load_model
        from tools.random_models import build_random_sdxl

        folder = build_random_sdxl(Path(tempfile.mkdtemp(prefix="tiny-sdxl-")), latent_size=8)
        model = load_model(folder, components=("unet",), device=device, dtype=dtype)
        shutil.rmtree(folder, ignore_errors=True)
        return model, random_conditioning(model, count)
    model = random_full_size(args.arch, device, dtype)
    return model, random_conditioning(model, count)


def restart_compile(args, size: int, cache_dir: Path) -> float:
    """Compile time in a fresh process from the filled compile cache (a restarted replica)."""
    command = [sys.executable, "-m", "bench.bench_compile", "--compile-only", "--arch", args.arch,
               "--size", str(size), "--device", args.device, "--compile-cache", str(cache_dir),
               "--max-rows", str(args.max_rows)] + (["--mode", args.mode] if args.mode else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["compile_s"]


# --- the run --------------------------------------------------------------------------------------

def measure(args, model, compiled, conditioning, size, levels, caches) -> list[Level]:
    models = {"eager": model, "compiled": compiled}
    for impl in IMPLS:  # warm: kernels, allocator, CUDA graphs of the sizes used
        for cache in caches:
            run_group(models[impl], conditioning[:max(levels)], size, min(args.steps, 6), cache)
    results = {(impl, cache, n): Level(impl, cache, n, [], 0) for cache in caches for n in levels for impl in IMPLS}
    for repeat in range(args.repeats):
        for cache in caches:
            for n in levels:
                for impl in IMPLS:
                    seconds, cached = run_group(models[impl], conditioning[:n], size, args.steps, cache)
                    level = results[impl, cache, n]
                    level.seconds.append(seconds)
                    level.cached = cached
                    print(f"run {repeat + 1}/{args.repeats} cache {cache} n={n} {impl}: {seconds:.3f} s, "
                          f"{cached} steps cached", flush=True)
    return list(results.values())


def tables(args, levels: list[Level], caches: list[str], mode: str, compile_s: float, restart_s: float | None,
           costs: dict[str, tuple[float, float]], share: float, graphs: int) -> tuple[str, str]:
    by = {(lv.impl, lv.cache, lv.n): lv for lv in levels}
    header = ["cache", "requests", "eager s/image", "compiled s/image", "eager images/s", "compiled images/s",
              "compiled / eager", "steps cached per request"]
    rows = []
    for cache in caches:
        for n in sorted({lv.n for lv in levels}):
            eager, comp = by["eager", cache, n], by["compiled", cache, n]
            rows.append((cache, n, Repeated.of(s / n for s in eager.seconds), Repeated.of(s / n for s in comp.seconds),
                         Repeated.of(n / s for s in eager.seconds), Repeated.of(n / s for s in comp.seconds),
                         ratio([n / s for s in comp.seconds], [n / s for s in eager.seconds]),
                         number(comp.cached / n)))
    main = markdown_table(header, rows)
    cost_rows = [(impl, number(c), number(k), number(k / c), number(share)) for impl, (c, k) in costs.items()]
    cost_table = markdown_table(["UNet", "computed step ms (2 rows)", "cached step ms (head only)",
                                 "cached / computed", "head FLOP share"], cost_rows)
    compile_line = (f"Compile ({mode}), warm-up included: {compile_s:.1f} s with an empty cache"
                    + (f", {restart_s:.1f} s in a new process from the cache" if restart_s is not None else "")
                    + f"; {graphs} graphs compiled during the timed runs and their warm-up runs (0: no recompiles).")
    target = TARGETS.get(args.arch, "")
    return main + "\n\n" + cost_table + "\n\n" + compile_line + (f"\n\nTargets: {target}." if target else ""), compile_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(SIZES), default="builtin")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the architecture's native)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--requests", default="1,8,16", help="request counts stepped together")
    parser.add_argument("--caches", default="off,default", help="off, default, fixed (13/25 forced)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--mode", help="torch.compile mode (default: reduce-overhead on CUDA, default elsewhere)")
    parser.add_argument("--compile-cache", help="inductor cache folder, emptied first (default: a temporary one)")
    parser.add_argument("--max-rows", type=int, help="largest batch the compile warms (default: 2 x max requests)")
    parser.add_argument("--restart", action="store_true", help="also time a compile from the cache in a new process")
    parser.add_argument("--out", help="also write the tables to OUT/compile-ARCH-DEVICE.md")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args, report = parse_args(parser, "bench.bench_compile")
    levels = [int(n) for n in args.requests.split(",")]
    caches = args.caches.split(",")
    size = args.size or SIZES[args.arch]
    args.max_rows = args.max_rows or 2 * max(levels)
    device = select_device(args.device)
    dtype = default_dtype(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    temporary = None
    if args.compile_cache is None:
        temporary = tempfile.mkdtemp(prefix="raydiance-inductor-")
    cache_dir = Path(args.compile_cache or temporary)

    if args.compile_only:  # the restart measurement: a fresh process, the cache as left
        model, _ = build(args, device, dtype, 1)
        _, seconds = compile_model(model, size, cache_dir, args.mode, args.max_rows)
        print(json.dumps({"compile_s": seconds}))
        return
    shutil.rmtree(cache_dir, ignore_errors=True)
    model, conditioning = build(args, device, dtype, max(levels))
    compiled, compile_s = compile_model(model, size, cache_dir, args.mode, args.max_rows)
    restart_s = restart_compile(args, size, cache_dir) if args.restart else None
    share = head_flop_share(model, size)
    costs = {impl: step_costs(m, m.unet_parts, size) for impl, m in (("eager", model), ("compiled", compiled))}
    assert model.unet_parts is EAGER
    graphs = recompiles()
    levels_run = measure(args, model, compiled, conditioning, size, levels, caches)
    graphs = recompiles() - graphs
    if temporary:
        shutil.rmtree(temporary, ignore_errors=True)

    table, _ = tables(args, levels_run, caches, f"mode {compiled.unet_parts.mode}", compile_s, restart_s,
                      costs, share, graphs)
    weights = "trained weights" if args.arch == "builtin" else "random weights, random conditioning"
    name = f"compile: {args.arch} on {device.type}"
    notes = (f"{model.name} ({weights}), {size}x{size}, {args.steps} Euler steps, guidance {GUIDANCE}, "
             f"{str(dtype).removeprefix('torch.')} on {device.type}, in-process (no Ray). N requests stepped "
             "together by the engine's runner (one forward of 2N rows per step); s/image = run seconds / N, "
             "so N=1 is single-request latency. Cache: off; default = the family's First Block Cache "
             "(a skip rate of the trained built-in model only); fixed = a forced pattern skipping "
             f"{FIXED_SKIPS[0]} of every {FIXED_SKIPS[1]} steps. Computed/cached step: one UNet step at 2 rows, "
             "median of 10; head FLOP share: the head's FLOPs over a whole step (meta device). "
             f"{args.repeats} runs after one warm-up run of each setting.")
    report.record(name, table, notes)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"compile-{args.arch}-{device.type}.md").write_text(f"## {name}\n\n`{report.command}`\n\n{table}\n\n{notes}\n")
    report.save_figure(plot(args.arch, size, levels_run, caches, device), f"compile-{args.arch}-{device.type}")


def plot(arch: str, size: int, levels: list[Level], caches: list[str], device: torch.device):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    counts = sorted({lv.n for lv in levels})
    width = 0.8 / (2 * len(caches))
    for i, (cache, impl) in enumerate((c, m) for c in caches for m in IMPLS):
        figures = [Repeated.of(lv.n / s for s in lv.seconds) for n in counts for lv in levels
                   if (lv.impl, lv.cache, lv.n) == (impl, cache, n)]
        xs = [j + (i - len(caches)) * width + width / 2 for j in range(len(counts))]
        ax.bar(xs, [f.median for f in figures], width, color=COLOURS.get(cache, "tab:purple"),
               yerr=[[f.median - f.low for f in figures], [f.high - f.median for f in figures]],
               capsize=2, label=f"{impl}, cache {cache}", alpha=0.95 if impl == "compiled" else 0.4,
               hatch=None if impl == "compiled" else "//")
    ax.set_xticks(range(len(counts)), [str(n) for n in counts])
    ax.set_xlabel("requests stepped together")
    ax.set_ylabel("images per second (median, min-max)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    ax.set_title(f"{arch} {size}px on {name}: eager vs compiled")
    ax.legend(fontsize=7)
    return fig


if __name__ == "__main__":
    main()
