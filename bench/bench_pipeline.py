"""In-process pipeline vs diffusers' StableDiffusionPipeline on the built-in model.

    python -m bench.bench_pipeline [--images 20] [--steps 20]

Both run the same components in one process, interleaved image by image so that machine noise
hits both alike; prints seconds per image and the ratio, and draws a bar plot.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from bench.report import markdown_table, record, save_figure
from pipeline.denoise import DenoiseParams
from pipeline.generate import generate
from pipeline.loading import load_model
from pipeline.samplers import make_scheduler
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL
from tools.tiny_shapes.world import TRAIN_SCENES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(BUILTIN_MODEL)
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_MODEL, local_files_only=True)
    pipe.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    times: dict[str, list[float]] = {"raydiance in-process": [], "diffusers pipeline": []}
    for i in tqdm(range(args.images + 1), desc="images"):
        prompt = TRAIN_SCENES[i % len(TRAIN_SCENES)].prompt
        params = DenoiseParams(64, 64, steps=args.steps, guidance_scale=5.0, seed=i)
        start = time.perf_counter()
        generate(model, prompt, params)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(i))
        theirs = time.perf_counter() - start
        if i:  # the first image of each warms caches
            times["raydiance in-process"].append(ours)
            times["diffusers pipeline"].append(theirs)
    base = statistics.median(times["diffusers pipeline"])
    rows = [(name, statistics.median(t), statistics.median(t) / base) for name, t in times.items()]
    table = markdown_table(["pipeline", "s/image (median)", "ratio vs diffusers"], rows)
    record("pipeline: in-process vs diffusers", f"python -m bench.bench_pipeline --images {args.images} "
           f"--steps {args.steps}", table, f"tiny-shapes, 64x64, Euler, {args.steps} steps, guidance 5.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r[0] for r in rows], [r[1] for r in rows], color=["tab:blue", "tab:gray"])
    ax.set_ylabel("seconds per image")
    ax.set_title(f"tiny-shapes, {args.steps} steps, 1 thread")
    save_figure(fig, "pipeline")


if __name__ == "__main__":
    main()
