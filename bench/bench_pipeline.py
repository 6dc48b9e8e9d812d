"""In-process pipeline vs diffusers' StableDiffusionPipeline on the built-in model.

    python -m bench.bench_pipeline [--images 20] [--steps 20] [--repeats 3] [--no-record]

Both run the same components in one process, interleaved image by image so that machine noise
hits both alike, in ``--repeats`` runs; prints seconds per image and the ratio, and draws a bar plot.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from bench.report import Repeated, markdown_table, medians, parse_args, pyplot, ratio, spreads
from pipeline.request_params import DenoiseParams
from pipeline.generate import generate
from pipeline.loading import load_model
from pipeline.model import DiffusionModel
from pipeline.samplers import make_scheduler
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL
from tools.tiny_shapes.world import TRAIN_SCENES


OURS, THEIRS = "raydiance in-process", "diffusers pipeline"


def one_run(model: DiffusionModel, pipe: StableDiffusionPipeline, images: int, steps: int) -> dict[str, float]:
    """Median seconds per image of both pipelines over ``images`` prompts, interleaved image by
    image; an extra first image warms caches and is not counted."""
    times: dict[str, list[float]] = {OURS: [], THEIRS: []}
    for i in tqdm(range(images + 1), desc="images", leave=False):
        prompt = TRAIN_SCENES[i % len(TRAIN_SCENES)].prompt
        params = DenoiseParams(64, 64, steps=steps, guidance_scale=5.0, seed=i)
        start = time.perf_counter()
        generate(model, prompt, params)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(i))
        theirs = time.perf_counter() - start
        if i:
            times[OURS].append(ours)
            times[THEIRS].append(theirs)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20, help="timed images per run")
    parser.add_argument("--steps", type=int, default=20)
    args, report = parse_args(parser, "bench.bench_pipeline")
    torch.set_num_threads(1)
    model = load_model(BUILTIN_MODEL)
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_MODEL, local_files_only=True)
    pipe.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    runs = [one_run(model, pipe, args.images, args.steps) for _ in tqdm(range(args.repeats), desc="runs")]
    seconds = {name: Repeated.of(run[name] for run in runs) for name in (OURS, THEIRS)}
    vs_diffusers = ratio([run[OURS] for run in runs], [run[THEIRS] for run in runs])
    table = markdown_table(["pipeline", "s/image", "vs diffusers"],
                           [(OURS, seconds[OURS], vs_diffusers), (THEIRS, seconds[THEIRS], "reference")])
    report.record("pipeline: in-process vs diffusers", table,
                  f"tiny-shapes, 64x64, Euler, {args.steps} steps, guidance 5, one torch thread. A run: "
                  f"{args.images} images, each through both pipelines in turn (same prompt and seed), "
                  f"after one image that warms caches; its figure is the median over its images. "
                  f"{args.repeats} runs.")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    figures = [seconds[OURS], seconds[THEIRS]]
    ax.bar([OURS, THEIRS], medians(figures), yerr=spreads(figures), capsize=4, color=["tab:blue", "tab:gray"])
    ax.set_ylabel("seconds per image")
    ax.set_title(f"tiny-shapes, {args.steps} steps, 1 thread")
    report.save_figure(fig, "pipeline")


if __name__ == "__main__":
    main()
