"""First Block Cache: a threshold sweep in both modes, against no cache and DeepCache.

    python -m bench.bench_cache [--steps 25] [--thresholds 0.05,0.1,...] [--prompts 36]
                                [--random-prompts 4] [--models builtin,sd15,sdxl] [--no-deepcache]

Models: the trained built-in tiny-shapes (64x64) and random-weight SD1.5- and SDXL-architecture
UNets (32x32 latents), 25 Euler steps, guidance 5, one request at a time. For every variant,
image by image and interleaved with the uncached run of the same prompt and seed (so machine
noise hits both alike): steps cached, denoise speedup (the UNet loop only: no text encoding, no
VAE), PSNR of the decoded image against the uncached one, prompt accuracy (built-in model: both
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

from bench.report import markdown_table, record, save_figure
from pipeline.unet.cache_config import FirstBlockCacheConfig, default_cache_config
from pipeline.conditioning import Conditioning, encode_prompts
from pipeline.decode import decode_latents
from pipeline.denoise import DenoiseJob, DenoiseParams
from pipeline.first_block_cache import forward_unet_cached
from pipeline.loading import load_model
from pipeline.model import DiffusionModel
from tools.random_models import build_random_sd15, build_random_sdxl
from pipeline.samplers import make_scheduler
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL
from tools.tiny_shapes.world import HELD_OUT_SCENES, TRAIN_SCENES, Scene, is_correct
from pipeline.unet_parts import run_head, run_out, run_tail

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
        job = DenoiseJob(model, cond, params)
        while not job.done:
            (noise_pred,) = forward_unet_cached(model, [job.unet_rows()], [job.cache]).outputs
            job.advance(noise_pred)
    return clock.seconds, job.latents, job.cache.steps_cached if job.cache is not None else 0


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


def sweep(label: str, model: DiffusionModel, size: int, prompts: list[tuple[str, Scene | None]],
          variants: list[Variant], steps: int) -> dict[str, Tally]:
    tallies = {v.name: Tally() for v in variants}
    conds = encode_prompts(model, [p for p, _ in prompts], [None] * len(prompts))
    pipe = deepcache_pipe(model) if any(v.mode == "deepcache" for v in variants) else None
    # warm-up: first forwards pay allocator and kernel selection
    warm = DenoiseParams(size, size, steps=2, guidance_scale=GUIDANCE, seed=0)
    run_ours(model, conds[0], warm)
    if pipe is not None:
        run_deepcache(pipe, prompts[0][0], warm, 1)
    for i, ((prompt, scene), cond) in enumerate(tqdm(list(zip(prompts, conds)), desc=label)):
        base = DenoiseParams(size, size, steps=steps, guidance_scale=GUIDANCE, seed=1000 + i)
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
                params = DenoiseParams(size, size, steps=steps, guidance_scale=GUIDANCE, seed=1000 + i,
                                       cache=variant.config)
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
    return tallies


def builtin_prompts(count: int) -> list[tuple[str, Scene]]:
    held = list(HELD_OUT_SCENES)[: max(1, count // 3)]
    train = list(TRAIN_SCENES)[:: max(1, len(TRAIN_SCENES) // (count - len(held)))][: count - len(held)]
    return [(s.prompt, s) for s in train + held]


def random_prompts(count: int) -> list[tuple[str, None]]:
    return [(s.prompt, None) for s in TRAIN_SCENES[:: 17][:count]]


def make_variants(thresholds: list[float], modes: list[str], deepcache: list[int],
                  default: FirstBlockCacheConfig) -> list[Variant]:
    """No cache; each mode with WaveSpeed's window (whole schedule, no run limit); the default's
    mode with the default's window and run limit; the default itself; DeepCache."""
    variants = [Variant("no cache", "none")]
    for mode in modes:
        variants += [Variant(f"FBC {mode} {t:g}", mode, FirstBlockCacheConfig(threshold=t, mode=mode))
                     for t in thresholds]
    limited = f"start {default.start:g}, max {default.max_consecutive_hits} hits"
    variants += [Variant(f"FBC {default.mode} {t:g} ({limited})", default.mode,
                         dataclasses.replace(default, threshold=t))
                 for t in thresholds if t != default.threshold]
    variants.append(Variant(f"**FBC default: {default.mode} {default.threshold:g} ({limited})**",
                            default.mode, default))
    variants += [Variant(f"DeepCache interval {n}", "deepcache", interval=n) for n in deepcache]
    return variants


def summarize(model_name: str, tallies: dict[str, Tally], variants: list[Variant],
              shares: tuple[float, float]) -> list[list[object]]:
    rows = []
    for variant in variants:
        t = tallies[variant.name]
        if not t.seconds:
            continue
        steps, cached = sum(t.steps), sum(t.cached)
        wall = sum(b[0] for b in t.base_seconds) / sum(s[0] for s in t.seconds)
        speedup = sum(b[1] for b in t.base_seconds) / sum(s[1] for s in t.seconds)
        ideal: object = "-"
        ratio: object = "-"
        if variant.mode in ("residual", "reuse", "none"):
            share = shares[1] if variant.mode == "residual" else shares[0]
            ideal_value = steps / ((steps - cached) + cached * share)
            ideal, ratio = ideal_value, speedup / ideal_value
        accuracy = f"{100 * statistics.mean(t.correct):.0f}%" if t.correct else "-"
        rows.append([model_name, variant.name, f"{cached / len(t.steps):.1f}/{t.steps[0]}",
                     speedup, wall, f"{statistics.mean(t.psnr):.1f} / {min(t.psnr):.1f}", accuracy,
                     ideal, ratio])
    return rows


def plot(results: dict[str, list[list[object]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (model_name, rows) in zip(axes[0], results.items()):
        groups: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            name = str(row[1])
            group = ("DeepCache" if name.startswith("DeepCache") else
                     "FBC default" if "default" in name else
                     "FBC reuse (window, limit)" if "(" in name else " ".join(name.split()[:2]))
            mean_psnr = float(str(row[5]).split(" / ")[0])
            groups.setdefault(group, []).append((float(row[3]), mean_psnr))
        for group, points in groups.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=group)
        ax.axhline(30, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("denoise speedup vs uncached (CPU time)")
        ax.set_ylabel("PSNR vs uncached (dB, 100 = identical)")
        ax.set_title(model_name)
        ax.legend(fontsize=8)
    return save_figure(fig, "cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--thresholds", default="0.05,0.1,0.15,0.2,0.3")
    parser.add_argument("--modes", default="reuse,residual")
    parser.add_argument("--prompts", type=int, default=36, help="built-in model: prompts (1/3 held out)")
    parser.add_argument("--random-prompts", type=int, default=3, help="random-weight models: prompts")
    parser.add_argument("--models", default="builtin,sd15,sdxl")
    parser.add_argument("--deepcache", default="2,3,5", help="DeepCache intervals ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    intervals = [int(n) for n in args.deepcache.split(",") if n]
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        print("DeepCache not installed (pip install deepcache): peer skipped")
        intervals = []
    results: dict[str, list[list[object]]] = {}
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "builtin":
                model, size, prompts = load_model(BUILTIN_MODEL), 64, builtin_prompts(args.prompts)
                label = "built-in tiny-shapes 64x64"
            else:
                builder = build_random_sd15 if name == "sd15" else build_random_sdxl
                model = load_model(builder(Path(tmp) / name, latent_size=32))
                size, prompts = 32 * model.vae_scale_factor, random_prompts(args.random_prompts)
                label = f"random {name.upper()} 32x32 latents"
            shares = head_shares(model, size // model.vae_scale_factor)
            notes.append(f"{label}: head FLOP share {100 * shares[0]:.1f}% (reuse), "
                         f"{100 * shares[1]:.1f}% with the output layers (residual).")
            variants = make_variants(thresholds, modes, intervals, default_cache_config(model.family))
            try:
                tallies = sweep(label, model, size, prompts, variants, args.steps)
            except Exception as error:  # noqa: BLE001 - DeepCache is optional: retry without it
                if not any(v.mode == "deepcache" for v in variants):
                    raise
                notes.append(f"{label}: DeepCache failed ({type(error).__name__}: {error}); left out.")
                variants = [v for v in variants if v.mode != "deepcache"]
                tallies = sweep(label, model, size, prompts, variants, args.steps)
            results[label] = summarize(label, tallies, variants, shares)
            print(markdown_table(HEADER, results[label]))
    table = markdown_table(HEADER, [row for rows in results.values() for row in rows])
    command = (f"python -m bench.bench_cache --steps {args.steps} --thresholds {args.thresholds} "
               f"--prompts {args.prompts} --random-prompts {args.random_prompts} --models {args.models}")
    notes.append(f"{args.steps} Euler steps, guidance {GUIDANCE}, one request at a time, 1 torch thread. "
                 "Speedup: the UNet loop only, against the uncached run of the same prompt and seed "
                 "in the same run (DeepCache: against the same diffusers pipeline uncached), in "
                 "process CPU time (the machine was shared; wall time beside it); measured / ideal "
                 "uses the CPU-time speedup. "
                 "PSNR: decoded image vs uncached, mean / worst (100 = identical). Ideal: steps / "
                 "(computed + cached x head FLOP share). Accuracy: both colours right (world.is_correct), "
                 f"{args.prompts} prompts, a third held out.")
    record("cache: First Block Cache sweep", command, table, "\n".join(f"- {n}" for n in notes))
    plot(results)


HEADER = ["model", "variant", "steps cached", "denoise speedup (CPU time)", "speedup (wall)",
          "PSNR dB (mean / min)", "accuracy", "ideal speedup", "measured / ideal"]

if __name__ == "__main__":
    main()
