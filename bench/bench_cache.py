"""First Block Cache: the default against the previous one, what each of its parts buys (one
changed at a time), a threshold sweep, per sampler, against no cache and DeepCache.

    python -m bench.bench_cache [--steps 25] [--thresholds 0.05,0.1,...] [--modes reuse]
                                [--prompts 36] [--random-prompts 3] [--models builtin,sd15,sdxl]
                                [--samplers 'DPM++ 2M,Euler a,DDIM,UniPC'] [--deepcache 2,3,5]
                                [--repeats 3] [--no-record]

Models: the trained built-in tiny-shapes (64x64) and random-weight SD1.5- and SDXL-architecture
UNets (32x32 latents), 25 Euler steps, guidance 5, one request at a time, ``--repeats`` runs;
``--samplers``: the built-in model again with each of these samplers (no cache, the previous
default and the default only). For
every variant, image by image and interleaved with the uncached run of the same prompt and seed
(so machine noise hits both alike): steps cached, denoise speedup (the UNet loop only: no text
encoding, no VAE), PSNR of the decoded image against the uncached one, prompt accuracy (built-in model: both
colours right, ``world.is_correct``, over train and held-out prompts), and the ideal speedup of
the observed skip pattern from the head's FLOP share (counted on the meta device, where attention
decomposes into counted matmuls; on CPU FlopCounterMode misses the fused kernel).

DeepCache (``DeepCacheSDHelper`` on a diffusers pipeline of the same components, branch 0, its
fixed intervals) is the peer; its speedup is against the same diffusers pipeline uncached.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from bench.report import Repeated, markdown_table, medians, parse_args, pyplot, spreads
from pipeline.unet.cache_config import FirstBlockCacheConfig, default_cache_config
from pipeline.conditioning import Conditioning, encode_prompts
from pipeline.vae import decode_latents
from pipeline.denoise import Trajectory
from pipeline.request_params import DenoiseParams
from pipeline.engine.runner import run_step
from pipeline.loading import load_model
from pipeline.model import DiffusionModel
from tools.random_models import build_random_sd15, build_random_sdxl
from pipeline.samplers import make_scheduler
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL
from tools.tiny_shapes.world import HELD_OUT_SCENES, TRAIN_SCENES, Scene, is_correct
from pipeline.unet.split import run_head, run_out, run_tail

GUIDANCE = 5.0
PSNR_CAP = 100.0  # identical images: report 100 dB rather than infinity


@dataclass
class Variant:
    name: str
    mode: str  # "none" | "residual" | "reuse" | "deepcache"
    config: FirstBlockCacheConfig | None = None
    interval: int = 0  # DeepCache's cache_interval


@dataclass
class Tally:
    seconds: list[tuple[float, float]] = field(default_factory=list)  # (wall, CPU) per image
    base_seconds: list[tuple[float, float]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))


class Clock:
    """Wall and process CPU seconds: on a shared machine CPU time still measures the work done."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_) -> None:
        self.seconds = (time.perf_counter() - self.wall, time.process_time() - self.cpu)


def run_ours(model: DiffusionModel, cond: Conditioning,
             params: DenoiseParams) -> tuple[tuple[float, float], torch.Tensor, int]:
    """(wall, CPU) seconds of the denoising loop, final latents, steps cached."""
    with Clock() as clock:
        trajectory = Trajectory(model, cond, params)
        while not trajectory.done:
            run_step([trajectory])
    return clock.seconds, trajectory.latents, sum(trajectory.decisions)


def head_shares(model: DiffusionModel, latent: int) -> tuple[float, float]:
    """FLOP share of a cached step in reuse mode (the head) and residual mode (head + output layers)."""
    unet = copy.deepcopy(model.unet).to("meta")
    rows, dim = 2, unet.config.cross_attention_dim
    sample = torch.zeros(rows, unet.config.in_channels, latent, latent, device="meta")
    timestep = torch.zeros(rows, device="meta")
    ehs = torch.zeros(rows, 77, dim, device="meta")
    added = None
    if model.family == "sdxl":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(rows, pooled, device="meta"),
                 "time_ids": torch.zeros(rows, 6, device="meta")}

    def flops(fn) -> tuple[int, object]:
        with FlopCounterMode(display=False) as counter:
            value = fn()
        return counter.get_total_flops(), value

    with torch.no_grad():
        head_flops, head = flops(lambda: run_head(unet, sample, timestep, ehs, added))
        tail_flops, tail = flops(lambda: run_tail(unet, head))
        out_flops, _ = flops(lambda: run_out(unet, tail))
    total = head_flops + tail_flops + out_flops
    return head_flops / total, (head_flops + out_flops) / total


def deepcache_pipe(model: DiffusionModel):
    """A diffusers pipeline over a copy of the model's UNet (DeepCache rewires the UNet it wraps)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_scheduler("Euler", model.scheduler_config)
    unet = copy.deepcopy(model.unet)
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=unet,
            scheduler=scheduler, force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_deepcache(pipe, prompt: str, params: DenoiseParams,
                  interval: int) -> tuple[tuple[float, float], torch.Tensor]:
    from DeepCache import DeepCacheSDHelper

    helper = None
    if interval > 1:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
    try:
        with Clock() as clock:
            latents = pipe(prompt, num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
                           width=params.width, height=params.height, output_type="latent",
                           generator=torch.Generator().manual_seed(params.seed)).images
        return clock.seconds, latents
    finally:
        if helper is not None:
            helper.disable()


def measure_prompt(model: DiffusionModel, pipe, size: int, steps: int, i: int, prompt: str, scene: Scene | None,
                   cond: Conditioning, variants: list[Variant], tallies: dict[str, Tally],
                   sampler: str = "Euler") -> None:
    """Prompt ``i`` (seed 1000 + i) uncached, then under every variant, into ``tallies``."""
    base = DenoiseParams(size, size, steps=steps, guidance_scale=GUIDANCE, seed=1000 + i, sampler=sampler)
    base_seconds, base_latents, _ = run_ours(model, cond, base)
    base_pixels = decode_latents(model, base_latents)[0]
    dc_base: tuple[tuple[float, float], np.ndarray] | None = None
    for variant in variants:
        tally = tallies[variant.name]
        if variant.mode == "deepcache":
            if dc_base is None:
                seconds, latents = run_deepcache(pipe, prompt, base, 1)
                dc_base = (seconds, decode_latents(model, latents)[0])
            seconds, latents = run_deepcache(pipe, prompt, base, variant.interval)
            reference_seconds, reference_pixels = dc_base
            cached = steps - math.ceil(steps / variant.interval)
        elif variant.mode == "none":
            seconds, latents, cached = base_seconds, base_latents, 0
            reference_seconds, reference_pixels = base_seconds, base_pixels
        else:
            params = dataclasses.replace(base, cache=variant.config)
            seconds, latents, cached = run_ours(model, cond, params)
            reference_seconds, reference_pixels = base_seconds, base_pixels
        pixels = base_pixels if variant.mode == "none" else decode_latents(model, latents)[0]
        tally.seconds.append(seconds)
        tally.base_seconds.append(reference_seconds)
        tally.steps.append(steps)
        tally.cached.append(cached)
        tally.psnr.append(psnr(pixels, reference_pixels))
        if scene is not None:
            tally.correct.append(is_correct(Image.fromarray(pixels), scene))


def sweep(label: str, model: DiffusionModel, size: int, prompts: list[tuple[str, Scene | None]],
          variants: list[Variant], steps: int, repeats: int, sampler: str = "Euler") -> list[dict[str, Tally]]:
    """Every variant on every prompt, once per run: each run's tallies by variant."""
    conds = encode_prompts(model, [p for p, _ in prompts], [None] * len(prompts))
    pipe = deepcache_pipe(model) if any(v.mode == "deepcache" for v in variants) else None
    # warm-up: first forwards pay allocator and kernel selection
    warm = DenoiseParams(size, size, steps=2, guidance_scale=GUIDANCE, seed=0)
    run_ours(model, conds[0], warm)
    if pipe is not None:
        run_deepcache(pipe, prompts[0][0], warm, 1)
    runs = []
    for run in range(repeats):
        tallies = {v.name: Tally() for v in variants}
        for i, ((prompt, scene), cond) in enumerate(tqdm(list(zip(prompts, conds)),
                                                         desc=f"{label}, run {run + 1}/{repeats}")):
            measure_prompt(model, pipe, size, steps, i, prompt, scene, cond, variants, tallies, sampler)
        runs.append(tallies)
    return runs


def builtin_prompts(count: int) -> list[tuple[str, Scene]]:
    held = list(HELD_OUT_SCENES)[: max(1, count // 3)]
    train = list(TRAIN_SCENES)[:: max(1, len(TRAIN_SCENES) // (count - len(held)))][: count - len(held)]
    return [(s.prompt, s) for s in train + held]


def random_prompts(count: int) -> list[tuple[str, None]]:
    return [(s.prompt, None) for s in TRAIN_SCENES[:: 17][:count]]


# The defaults before issue 16's part 2, for the before/after rows.
PREVIOUS_DEFAULTS = {
    "sd15": FirstBlockCacheConfig(threshold=0.15, start=0.2, max_consecutive_hits=2, mode="reuse"),
    "sdxl": FirstBlockCacheConfig(threshold=0.2, start=0.2, max_consecutive_hits=2, mode="reuse"),
}


def describe(config: FirstBlockCacheConfig) -> str:
    """A config in a few words: mode, threshold, then what differs from the plain fields."""
    words = [f"{config.mode} {config.threshold:g}"]
    if config.order:
        words.append(f"order {config.order}")
    if config.rule != "last_computed":
        words.append(config.rule)
    window = []
    if config.start:
        window.append(f"start {config.start:g}")
    if config.end < 1:
        window.append(f"end {config.end:g}")
    if config.max_consecutive_hits is not None:
        growth = f" +{config.run_growth}/run" if config.run_growth else ""
        window.append(f"max {config.max_consecutive_hits} hits{growth}")
    return " ".join(words) + (f" ({', '.join(window)})" if window else "")


def ablations(default: FirstBlockCacheConfig, previous: FirstBlockCacheConfig) -> list[tuple[str, FirstBlockCacheConfig]]:
    """The default with one of its parts changed back or swapped, and the previous default with
    the extrapolation alone: (what changed, config), the duplicates of the default left out."""
    replace = dataclasses.replace
    other_rule = "last_computed" if default.rule == "accumulated" else "accumulated"
    candidates = [
        ("previous default + order 1", replace(previous, order=1)),
        ("previous default + rule accumulated", replace(previous, rule="accumulated")),
        (f"default, order {1 if default.order != 1 else 0}", replace(default, order=1 if default.order != 1 else 0)),
        (f"default, rule {other_rule}", replace(default, rule=other_rule)),
        ("default, no run growth", replace(default, run_growth=0)),
        ("default, end 0.9", replace(default, end=0.9)),
        ("default, mode residual", replace(default, mode="residual")),
    ]
    seen = {default, previous}
    chosen = []
    for what, config in candidates:
        if config not in seen:
            seen.add(config)
            chosen.append((what, config))
    return chosen


def make_variants(thresholds: list[float], modes: list[str], deepcache: list[int],
                  default: FirstBlockCacheConfig, previous: FirstBlockCacheConfig | None = None,
                  ablate: bool = True) -> list[Variant]:
    """No cache; each mode with WaveSpeed's window (whole schedule, no run limit); the previous
    default; the default with one part changed at a time; the default at other thresholds; the
    default itself; DeepCache."""
    variants = [Variant("no cache", "none")]
    for mode in modes:
        variants += [Variant(f"FBC {mode} {t:g}", mode, FirstBlockCacheConfig(threshold=t, mode=mode))
                     for t in thresholds]
    if previous is not None and previous != default:
        variants.append(Variant(f"previous default: {describe(previous)}", previous.mode, previous))
    if ablate:
        variants += [Variant(f"{what}: {describe(config)}", config.mode, config)
                     for what, config in ablations(default, previous or default)]
        variants += [Variant(f"default at {t:g}: {describe(dataclasses.replace(default, threshold=t))}",
                             default.mode, dataclasses.replace(default, threshold=t))
                     for t in thresholds if t != default.threshold]
    variants.append(Variant(f"**FBC default: {describe(default)}**", default.mode, default))
    variants += [Variant(f"DeepCache interval {n}", "deepcache", interval=n) for n in deepcache]
    return variants


# (header, key) of the table's figures; a variant without a key shows "-"
COLUMNS = (("denoise s/image (CPU)", "seconds"), ("steps cached (mean)", "cached"),
           ("denoise speedup (CPU time)", "speedup"), ("speedup (wall)", "wall"), ("PSNR dB (mean)", "psnr"),
           ("PSNR dB (min)", "psnr min"), ("accuracy %", "accuracy"), ("ideal speedup", "ideal"),
           ("measured / ideal", "of ideal"))


def run_figures(t: Tally, variant: Variant, shares: tuple[float, float]) -> dict[str, float]:
    """One run's figures of one variant. The reference (no cache) has no steps cached, speedup
    or PSNR: they would be 0, 1 and identical by construction."""
    images, steps, cached = len(t.steps), sum(t.steps), sum(t.cached)
    figures = {"seconds": sum(s[1] for s in t.seconds) / images}
    if t.correct:
        figures["accuracy"] = 100 * statistics.mean(t.correct)
    if variant.mode == "none":
        return figures
    figures.update(cached=cached / images, speedup=sum(b[1] for b in t.base_seconds) / sum(s[1] for s in t.seconds),
                   wall=sum(b[0] for b in t.base_seconds) / sum(s[0] for s in t.seconds),
                   psnr=statistics.mean(t.psnr), **{"psnr min": min(t.psnr)})
    if variant.mode in ("residual", "reuse"):
        share = shares[1] if variant.mode == "residual" else shares[0]
        ideal = steps / ((steps - cached) + cached * share)
        figures.update(ideal=ideal, **{"of ideal": figures["speedup"] / ideal})
    return figures


def summarize(runs: list[dict[str, Tally]], variants: list[Variant],
              shares: tuple[float, float]) -> list[tuple[Variant, dict[str, Repeated]]]:
    """Each variant's figures over the runs (a ratio such as the speedup is taken within each run)."""
    summary = []
    for variant in variants:
        per_run = [run_figures(tallies[variant.name], variant, shares) for tallies in runs]
        summary.append((variant, {key: Repeated.of(figures[key] for figures in per_run) for key in per_run[0]}))
    return summary


def table(results: dict[str, list[tuple[Variant, dict[str, Repeated]]]]) -> str:
    return markdown_table(["model", "variant", *(header for header, _ in COLUMNS)],
                          [(label, variant.name, *(figures.get(key, "-") for _, key in COLUMNS))
                           for label, summary in results.items() for variant, figures in summary])


def plot(results: dict[str, list[tuple[Variant, dict[str, Repeated]]]]):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (model_name, summary) in zip(axes[0], results.items()):
        groups: dict[str, list[tuple[Repeated, Repeated]]] = {}
        for variant, figures in summary:
            if "speedup" not in figures:
                continue
            group = ("DeepCache" if variant.mode == "deepcache" else
                     "FBC default, by threshold" if variant.name.startswith(("**FBC default", "default at")) else
                     "previous default" if variant.name.startswith("previous default:") else
                     "one part changed" if ":" in variant.name else f"FBC {variant.mode} (whole schedule)")
            groups.setdefault(group, []).append((figures["speedup"], figures["psnr"]))
        for group, points in groups.items():
            points.sort(key=lambda p: p[0].median)
            speedups, psnrs = [p[0] for p in points], [p[1] for p in points]
            ax.errorbar(medians(speedups), medians(psnrs), xerr=spreads(speedups), yerr=spreads(psnrs),
                        fmt="o" if group in ("one part changed", "previous default") else "o-",
                        capsize=2, label=group)
        ax.axhline(30, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("denoise speedup vs uncached (CPU time; median, min-max)")
        ax.set_ylabel("PSNR vs uncached (dB, 100 = identical)")
        ax.set_title(model_name)
        ax.legend(fontsize=8)
    return fig


def load(name: str, tmp: Path, prompt_count: int, random_count: int) -> tuple[str, DiffusionModel, int, list]:
    """(label, model, image side, prompts) of ``builtin``, ``sd15`` or ``sdxl``."""
    if name == "builtin":
        return "built-in tiny-shapes 64x64", load_model(BUILTIN_MODEL), 64, builtin_prompts(prompt_count)
    builder = build_random_sd15 if name == "sd15" else build_random_sdxl
    model = load_model(builder(tmp / name, latent_size=32))
    return f"random {name.upper()} 32x32 latents", model, 32 * model.vae_scale_factor, random_prompts(random_count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--thresholds", default="0.1,0.2,0.3",
                        help="thresholds for the whole-schedule rows and the default's sweep")
    parser.add_argument("--modes", default="reuse", help="modes of the whole-schedule rows")
    parser.add_argument("--prompts", type=int, default=36, help="built-in model: prompts (1/3 held out)")
    parser.add_argument("--random-prompts", type=int, default=3, help="random-weight models: prompts")
    parser.add_argument("--models", default="builtin,sd15,sdxl")
    parser.add_argument("--samplers", default="DPM++ 2M,Euler a,DDIM,UniPC",
                        help="built-in model: these samplers too, default vs previous ('' for none)")
    parser.add_argument("--deepcache", default="2,3,5", help="DeepCache intervals ('' for none)")
    args, report = parse_args(parser, "bench.bench_cache")
    torch.set_num_threads(1)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    intervals = [int(n) for n in args.deepcache.split(",") if n]
    if intervals and importlib.util.find_spec("DeepCache") is None:
        print("DeepCache not installed (pip install deepcache): peer skipped")
        intervals = []
    results: dict[str, list[tuple[Variant, dict[str, Repeated]]]] = {}
    notes = []
    model_labels: list[str] = []  # the plot's panels: one per model, not per sampler
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            label, model, size, prompts = load(name, Path(tmp), args.prompts, args.random_prompts)
            shares = head_shares(model, size // model.vae_scale_factor)
            notes.append(f"{label}: head FLOP share {100 * shares[0]:.1f}% (reuse), "
                         f"{100 * shares[1]:.1f}% with the output layers (residual).")
            default, previous = default_cache_config(model.family), PREVIOUS_DEFAULTS.get(model.family)
            variants = make_variants(thresholds, modes, intervals, default, previous)
            try:
                runs = sweep(label, model, size, prompts, variants, args.steps, args.repeats)
            except Exception as error:  # noqa: BLE001 - DeepCache is optional: retry without it
                if not any(v.mode == "deepcache" for v in variants):
                    raise
                notes.append(f"{label}: DeepCache failed ({type(error).__name__}: {error}); left out.")
                variants = [v for v in variants if v.mode != "deepcache"]
                runs = sweep(label, model, size, prompts, variants, args.steps, args.repeats)
            results[label] = summarize(runs, variants, shares)
            model_labels.append(label)
            print(table({label: results[label]}))
            if name != "builtin":
                continue
            for sampler in samplers:
                sampled = f"{label}, {sampler}"
                variants = make_variants([], [], [], default, previous, ablate=False)
                runs = sweep(sampled, model, size, prompts, variants, args.steps, args.repeats, sampler)
                results[sampled] = summarize(runs, variants, shares)
                print(table({sampled: results[sampled]}))
    notes.append(f"{args.steps} steps, Euler unless the model column names a sampler, guidance {GUIDANCE}, "
                 "one request at a time, 1 torch thread. "
                 "A run: every prompt uncached, then under every variant in turn (same seed). "
                 f"{args.repeats} runs. Seconds: the UNet loop only (no text encoding, no VAE; DeepCache: "
                 "diffusers' pipeline with output_type='latent'), process CPU time (the machine may be "
                 "shared; the wall-time speedup beside it). Speedup: against the uncached run of the same "
                 "prompt and seed in the same run (DeepCache: against the same diffusers pipeline "
                 "uncached); measured / ideal uses the CPU-time speedup. PSNR: "
                 "decoded image vs uncached, mean and worst over the prompts (100 = identical). Ideal: "
                 "steps / (computed + cached x head FLOP share). Accuracy: both colours right "
                 f"(world.is_correct), {args.prompts} prompts, a third held out. Variants: mode and "
                 "threshold; order (extrapolation from the last computed steps), rule (accumulated: "
                 "TeaCache's sum of step-to-step diffs), window and run limit (+n/run: run_growth) "
                 "where they are not the plain fields'. \"one part changed\" rows: the default with "
                 "that part alone changed.")
    report.record("cache: First Block Cache sweep", table(results), "\n".join(f"- {n}" for n in notes))
    report.save_figure(plot({label: results[label] for label in model_labels}), "cache")


if __name__ == "__main__":
    main()
