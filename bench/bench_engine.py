"""The Denoiser engine in-process, on any device: N requests denoised together vs one at a time.

    python -m bench.bench_engine [--arch builtin|sd15|sdxl] [--size PX] [--steps 25] [--requests 1,2,4,8,16] [--cache]
                                [--repeats 3] [--no-record]

What one Denoiser replica does, without Ray or HTTP. For each N, N requests with different
seeds are denoised (1) one after another, each alone in its forwards (what ``max_batch_rows`` of
one request gives), then (2) submitted together to one ``DenoiseEngine``, which runs their steps
in shared UNet forwards; each N once per run, ``--repeats`` runs. Prints images/s of both, their
ratio, the mean rows per forward, and the largest difference between a request's final latents
alone and amid the others (batch invariance on this device and dtype).

``builtin``: the tiny-shapes model with real prompts. ``sd15`` / ``sdxl``: the full-size UNet of
SD1.5 / SDXL base from the bundled configs with random weights and random conditioning of the
real shapes (nothing is downloaded; only speed is measured). First Block Cache is off unless
``--cache`` turns on the family default (meaningful for the trained built-in model only: random
weights make the skip pattern arbitrary; ``bench_cache`` measures the cache). fp16 on CUDA, fp32
on CPU. Writes bench/out/engine-ARCH-DEVICE.png and its "engine: ..." section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench.full_size import random_model
from bench.report import Repeated, checked, markdown_table, parse_args, plot_levels, pyplot, ratio
from pipeline.unet.cache_config import default_cache_config
from pipeline.conditioning import Conditioning
from pipeline.request_params import DenoiseParams
from pipeline.device import default_dtype, select_device
from pipeline.engine import DenoiseEngine, EngineResult
from pipeline.model import DiffusionModel

NATIVE_SIZE = {"builtin": 64, "sd15": 512, "sdxl": 1024}
GUIDANCE = 5.0


def random_full_size(family: str, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    """SD1.5 or SDXL base's UNet and VAE at full size, random weights, built on ``device`` in
    ``dtype`` (``bench.full_size``, the one way benchmarks build a full-size model)."""
    return random_model(family, ("unet", "vae"), device, dtype)


def random_conditioning(model: DiffusionModel, count: int) -> list[Conditioning]:
    config = model.unet.config
    tokens = (77, config.cross_attention_dim)
    pooled = None
    if model.family == "sdxl":  # the pooled text embedding: what the added embedding takes beside time ids
        pooled = (config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,)
    generator = torch.Generator().manual_seed(1)

    def draw(shape: tuple[int, ...] | None) -> torch.Tensor | None:
        return None if shape is None else torch.randn(shape, generator=generator)

    return [Conditioning(draw(tokens), draw(tokens), draw(pooled), draw(pooled)) for _ in range(count)]


def builtin(device: torch.device, dtype: torch.dtype, count: int) -> tuple[DiffusionModel, list[Conditioning]]:
    from pipeline.conditioning import encode_prompts
    from pipeline.loading import load_model
    from tools.tiny_shapes import MODEL_DIR
    from tools.tiny_shapes.world import TRAIN_SCENES

    model = load_model(MODEL_DIR, device=device, dtype=dtype)
    prompts = [TRAIN_SCENES[i % len(TRAIN_SCENES)].prompt for i in range(count)]
    with torch.inference_mode():
        return model, encode_prompts(model, prompts, [None] * count)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def timed(engine: DenoiseEngine, model: DiffusionModel, requests: list[tuple[Conditioning, DenoiseParams]],
                together: bool) -> tuple[float, list[EngineResult]]:
    synchronize(model.unet.device)
    start = time.perf_counter()
    if together:
        results = await asyncio.gather(*(engine.submit(model, *r) for r in requests))
    else:
        results = [await engine.submit(model, *r) for r in requests]
    synchronize(model.unet.device)
    return time.perf_counter() - start, results


@dataclass
class LevelRun:
    """N requests in one run: one at a time, then together."""

    n: int
    alone_s: float
    together_s: float
    rows_per_forward: float
    max_diff: float  # the largest |latent alone - latent in the batch| over the requests
    steps_cached: float  # mean over the requests, in the batch
    same_decisions: bool  # every request skipped the same steps alone and in the batch


async def measure_level(engine: DenoiseEngine, model: DiffusionModel,
                        requests: list[tuple[Conditioning, DenoiseParams]]) -> LevelRun:
    n = len(requests)
    alone_s, alone = await timed(engine, model, requests, together=False)
    forwards, rows_run = engine.forwards, engine.rows
    together_s, together = await timed(engine, model, requests, together=True)
    mean_rows = (engine.rows - rows_run) / (engine.forwards - forwards)
    diff = max((a.latents.float() - b.latents.float()).abs().max().item() for a, b in zip(alone, together))
    same = all(a.cache_decisions == b.cache_decisions for a, b in zip(alone, together))
    cached = sum(r.steps_cached for r in together) / n
    return LevelRun(n, alone_s, together_s, mean_rows, diff, cached, same)


async def measure(model: DiffusionModel, conditioning: list[Conditioning], size: int, steps: int,
                  levels: list[int], cache: bool, repeats: int) -> dict[int, list[LevelRun]]:
    """Each level once per run, the levels in turn within a run."""
    engine = DenoiseEngine(max_batch_rows=2 * max(levels))
    config = default_cache_config(model.family) if cache else None
    requests = [(c, DenoiseParams(size, size, steps=steps, guidance_scale=GUIDANCE, seed=i,
                                               cache=config))
                for i, c in enumerate(conditioning)]
    await timed(engine, model, requests[:2], together=True)  # warm: kernels, allocator
    runs: dict[int, list[LevelRun]] = {n: [] for n in levels}
    for _ in tqdm(range(repeats), desc=f"{model.name} {size}px, runs"):
        for n in levels:
            runs[n].append(await measure_level(engine, model, requests[:n]))
    await engine.close()
    return runs


def table_rows(runs: dict[int, list[LevelRun]], cache: bool) -> tuple[list[str], list[tuple]]:
    """The header and a row per level. The cache columns only with the cache on: off, every
    step is computed and the decisions are all-False alike, a check that cannot fail."""
    header = ["requests", "one at a time images/s", "engine images/s", "engine / one at a time",
              "rows per forward", "max latent diff"]
    header += ["steps cached (mean)", "same cache decisions"] if cache else []
    rows = []
    for n, level in runs.items():
        alone = [n / r.alone_s for r in level]
        together = [n / r.together_s for r in level]
        row = (n, Repeated.of(alone), Repeated.of(together), ratio(together, alone),
               Repeated.of(r.rows_per_forward for r in level), Repeated.of(r.max_diff for r in level))
        if cache:
            row += (Repeated.of(r.steps_cached for r in level), checked([r.same_decisions for r in level]))
        rows.append(row)
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(NATIVE_SIZE), default="builtin")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the architecture's native)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--requests", default="1,2,4,8,16", help="concurrent request counts")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--cache", action="store_true", help="First Block Cache at the family default")
    args, report = parse_args(parser, "bench.bench_engine")
    levels = [int(n) for n in args.requests.split(",")]
    size = args.size or NATIVE_SIZE[args.arch]

    device = select_device(args.device)
    dtype = default_dtype(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.arch == "builtin":
        model, conditioning = builtin(device, dtype, max(levels))
    else:
        model = random_full_size(args.arch, device, dtype)
        conditioning = random_conditioning(model, max(levels))
    runs = asyncio.run(measure(model, conditioning, size, args.steps, levels, args.cache, args.repeats))

    weights = "trained weights" if args.arch == "builtin" else "random weights, random conditioning"
    cache = ("First Block Cache at the family default. Same cache decisions: each request skipped the "
             "same steps alone and in the batch" if args.cache else "First Block Cache off (every step computed)")
    report.record(f"engine: {args.arch} on {device.type}" + (", cache on" if args.cache else ""),
                  markdown_table(*table_rows(runs, args.cache)),
                  f"{model.name} ({weights}), {size}x{size}, {args.steps} Euler steps, guidance {GUIDANCE}, "
                  f"{str(dtype).removeprefix('torch.')} on {device.type}, in-process (no Ray, no HTTP). "
                  "One at a time: each request alone in its forwards (2 rows). Engine: all submitted "
                  "together to one DenoiseEngine. Max latent diff: the largest |latent alone - latent in "
                  f"the batch| over a run's requests. {cache}. {args.repeats} runs, each level in turn "
                  "within a run, after one warm-up batch.")
    report.save_figure(plot(args.arch, size, runs, model.unet.device), f"engine-{args.arch}-{device.type}")


def plot(arch: str, size: int, runs: dict[int, list[LevelRun]], device: torch.device):
    plt = pyplot()
    levels = list(runs)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    plot_levels(ax, levels, {
        "one at a time": ([Repeated.of(n / r.alone_s for r in runs[n]) for n in levels], "tab:gray"),
        "engine, together": ([Repeated.of(n / r.together_s for r in runs[n]) for n in levels], "tab:blue"),
    }, "requests in flight")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, 1 thread"
    ax.set_title(f"{arch} {size}px on {name}")
    return fig


if __name__ == "__main__":
    main()
