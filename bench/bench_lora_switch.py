"""Switching LoRA sets on a compiled UNet: what a switch costs the first time a set is seen and
every time after, against running on with the same set.

    python -m bench.bench_lora_switch [--arch builtin|sd15|sdxl] [--loras 3] [--rounds 3] [--repeats 3] [--no-record]

A compiled UNet takes its LoRAs through one slot adapter that each set is written into
(``pipeline.lora_slot``): a switch copies weights, and only a set that needs the slot to grow
compiles (the first LoRA; the slot starts at rank 32). ``--loras`` random rank-16 LoRAs
(``tools.random_models.write_unet_lora``) make the sets: each alone, all of them at weight 0.5
(rank 16 x N: past 32, the slot grows once), and none. Each round activates every set in turn
and runs one request for ``--steps`` steps with it; round 1 meets every set for the first time,
the later rounds switch among sets seen before. The "same set" column runs the steps again with
no switch. Each repeat builds and compiles the model afresh (``torch._dynamo.reset``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_compile import SIZES, build, compile_model, run_group, synchronize
from bench.report import Repeated, markdown_table, number, parse_args, pyplot
from pipeline.device import default_dtype, select_device
from pipeline.library import LoraLibrary
from pipeline.lora import AdapterManager
from pipeline.unet.compiled import recompiles
from tools.random_models import write_unet_lora

COLUMNS = ("first switch to a set", "later switch", "same set")


def sets(names: list[str]) -> list[list[tuple[str, float]]]:
    return [*([(name, 1.0)] for name in names), [(name, 0.5) for name in names], []]


def one_repeat(args, device, dtype, size: int, folder: Path) -> dict[str, float | int]:
    """Medians of one fresh compiled model: seconds per column, and graphs per round."""
    torch._dynamo.reset()
    model, conditioning = build(args, device, dtype, 1)
    with tempfile.TemporaryDirectory(prefix="raydiance-inductor-") as cache:
        compiled, _ = compile_model(model, size, Path(cache), args.mode, 2)
        names = [f"lora_{i}" for i in range(args.loras)]
        for i, name in enumerate(names):
            write_unet_lora(model.unet, folder / f"{name}.safetensors", seed=i)
        manager = AdapterManager(compiled, LoraLibrary(folder), max_loaded=args.loras)
        timings: dict[str, list[float]] = {column: [] for column in COLUMNS}
        graphs = []
        for round_ in range(args.rounds):
            before = recompiles()
            for loras in sets(names):
                manager.load(loras)  # the file read and injected, as a server does on arrival
                synchronize(compiled.unet.device)
                start = time.perf_counter()
                manager.activate(loras)
                run_group(compiled, conditioning, size, args.steps, "off")
                timings[COLUMNS[0] if round_ == 0 else COLUMNS[1]].append(time.perf_counter() - start)
                timings[COLUMNS[2]].append(run_group(compiled, conditioning, size, args.steps, "off")[0])
            graphs.append(recompiles() - before)
    return {**{column: statistics.median(values) for column, values in timings.items()},
            "graphs first round": graphs[0], "graphs later rounds": sum(graphs[1:]), "slot rank": manager.slot.rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(SIZES), default="builtin")
    parser.add_argument("--loras", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps run after each switch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--mode", help="torch.compile mode (default: reduce-overhead on CUDA, default elsewhere)")
    args, report = parse_args(parser, "bench.bench_lora_switch")
    device = select_device(args.device)
    dtype = default_dtype(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    size = SIZES[args.arch]
    runs = []
    with tempfile.TemporaryDirectory(prefix="raydiance-loras-") as folder:
        for repeat in range(args.repeats):
            runs.append(one_repeat(args, device, dtype, size, Path(folder)))
            print(f"repeat {repeat + 1}/{args.repeats}: {runs[-1]}", flush=True)
    figures = {column: Repeated.of(run[column] for run in runs) for column in COLUMNS}
    table = markdown_table(
        [f"{column} (s, {args.steps} steps)" for column in COLUMNS] + ["graphs compiled: first round / later rounds", "slot rank"],
        [[*figures.values(), f"{number(statistics.median(r['graphs first round'] for r in runs))} / "
          f"{number(statistics.median(r['graphs later rounds'] for r in runs))}", runs[0]["slot rank"]]])
    notes = (f"{args.arch} at {size}x{size}, {str(dtype).removeprefix('torch.')} on {device.type}, compiled "
             f"(inductor, mode {args.mode or 'the default for the device'}), in-process; {args.loras} random "
             f"rank-16 LoRAs, {len(sets(list(range(args.loras))))} sets (each alone, all at 0.5, none), "
             f"{args.rounds} rounds; each cell: the median over the switches of a run, then over "
             f"{args.repeats} runs (min-max). A switch: activate the set, then one request for {args.steps} "
             "steps; same set: those steps again with no switch.")
    report.record(f"LoRA switch: {args.arch} on {device.type}", table, notes)
    print(table)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar(range(len(COLUMNS)), [f.median for f in figures.values()],
           yerr=[[f.median - f.low for f in figures.values()], [f.high - f.median for f in figures.values()]],
           capsize=3, color=("tab:red", "tab:blue", "tab:gray"))
    ax.set_xticks(range(len(COLUMNS)), COLUMNS)
    ax.set_yscale("log")
    ax.set_ylabel(f"seconds (activate + {args.steps} steps)")
    ax.set_title(f"LoRA set switches, compiled {args.arch} UNet ({device.type})")
    fig.tight_layout()
    report.save_figure(fig, f"lora-switch-{args.arch}-{device.type}")


if __name__ == "__main__":
    main()
