"""Shared output of the benchmarks: a markdown table on stdout, a PNG plot, a RESULTS.md section."""
from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path
from typing import Sequence

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
RESULTS = BENCH_DIR / "RESULTS.md"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        else:
            device = "no GPU, torch threads 1 per process"
    except Exception:  # noqa: BLE001 - a description, never a failure
        device = "unknown"
    return f"{platform.machine()}, {os.cpu_count()} cores, {device}"


def record(name: str, command: str, table: str, notes: str = "") -> None:
    """Print ``table`` and replace benchmark ``name``'s section of bench/RESULTS.md with it."""
    print(table)
    section = (f"## {name}\n\n{datetime.date.today().isoformat()} · {machine()} · `{command}`\n\n"
               f"{table}\n" + (f"\n{notes}\n" if notes else ""))
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach benchmark's latest run.\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")


def plot_path(name: str) -> Path:
    OUT_DIR.mkdir(exist_ok=True)
    return OUT_DIR / f"{name}.png"


def save_figure(fig, name: str) -> Path:
    """Lay out and write a matplotlib figure to bench/out/NAME.png, and say where."""
    fig.tight_layout()
    path = plot_path(name)
    fig.savefig(path)
    print(f"plot: {path}")
    return path
