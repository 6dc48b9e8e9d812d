"""Shared output of the benchmarks: figures from repeated runs, summarized as median (min-max),
in markdown tables on stdout, PNG plots with min-max error bars, and each benchmark's section of
bench/RESULTS.md, which only this module writes (header included): nothing hand-written there
survives the next run, so nothing hand-written goes there.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
TRIAL_DIR = OUT_DIR / "trial"  # plots of runs that are not recorded
RESULTS = BENCH_DIR / "RESULTS.md"
MIN_REPEATS = 3  # a section of RESULTS.md comes from at least this many runs

HEADER = (
    "# Benchmark results\n\n"
    "Each benchmark's latest run, written by the benchmark itself (`bench/report.py`): running the "
    "command under a section's title replaces that section, so this file holds nothing "
    "hand-written. A section whose command has `--repeats` comes from that many runs and each "
    "figure reads `median (min-max)` over them (a figure without a range was the same in every "
    "run; a ratio is taken within each run, between figures measured in the same round, then "
    "summarized the same way); a section without it predates that rule.\n")


# --- figures from repeated runs ------------------------------------------------------------------

@dataclass(frozen=True)
class Repeated:
    """One figure measured once per run; printed as ``median (min-max)``."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Repeated:
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("a figure needs at least one run")
        return cls(values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def __str__(self) -> str:
        low, high = number(self.low), number(self.high)
        if low == high:  # the same in every run, to the digits shown
            return number(self.median)
        dash = " to " if "e" in low + high or low.startswith("-") else "-"  # never 1e-05-2e-05
        return f"{number(self.median)} ({low}{dash}{high})"


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Repeated:
    """``numerator / denominator`` taken run by run (both measured in the same round), then
    summarized: machine noise that hits both sides of one round cancels."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} runs against {len(denominator)}")
    return Repeated.of(a / b for a, b in zip(numerator, denominator))


def number(value: float) -> str:
    """Three significant digits, trailing zeros kept (``1.20``), no exponent below 1e6."""
    if value == 0:
        return "0"
    if 1000 <= abs(value) < 1e6:
        return f"{value:.0f}"
    return f"{value:#.3g}".rstrip(".")


def checked(passes: Sequence[bool]) -> str:
    """A check made once per run: ``yes`` when it held in every run."""
    failed = len(passes) - sum(passes)
    return "yes" if not failed else f"NO ({failed} of {len(passes)} runs)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return number(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(parser: argparse.ArgumentParser, module: str,
               *aliases: str) -> tuple[argparse.Namespace, Report]:
    """Every benchmark's command line: its own options, then ``--repeats`` (``aliases``: older
    names of it) and ``--no-record``; the arguments and the run's Report."""
    parser.add_argument("--repeats", *aliases, type=positive_int, default=MIN_REPEATS,
                        help=f"runs of every measurement (RESULTS.md takes >= {MIN_REPEATS})")
    parser.add_argument("--no-record", action="store_true",
                        help=f"print only: RESULTS.md untouched, plots to {TRIAL_DIR.relative_to(BENCH_DIR.parent)}/")
    args = parser.parse_args()
    return args, Report(module, args)


def command_line(module: str, args: argparse.Namespace) -> str:
    """The command that repeats this run: every option as parsed, defaults included."""
    words = ["python", "-m", module]
    for dest, value in vars(args).items():
        if dest == "no_record" or value is None or value is False:
            continue
        words.append("--" + dest.replace("_", "-"))
        if value is not True:
            words.append(shlex.quote(str(value)))
    return " ".join(words)


# --- output --------------------------------------------------------------------------------------

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


def replace_section(text: str, name: str, section: str) -> str:
    """RESULTS.md's ``text`` with section ``name`` replaced (or appended) and the header renewed."""
    sections = text[text.find("\n## ") + 1:] if "\n## " in text else ""
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(sections):
        sections = pattern.sub(lambda _: section + "\n", sections)
    else:
        sections = sections.rstrip() + "\n\n" + section
    return HEADER + "\n" + sections.strip() + "\n"


@dataclass(frozen=True)
class Report:
    """Where one benchmark run goes: ``record`` prints its tables and writes its RESULTS.md section
    with the command that repeats it; ``save_figure`` writes its plot to bench/out/. With
    ``--no-record``, or fewer than MIN_REPEATS runs, nothing is written but bench/out/trial/."""

    module: str  # "bench.bench_dag": what ``python -m`` runs
    args: argparse.Namespace

    @property
    def recording(self) -> bool:
        return not self.args.no_record and self.args.repeats >= MIN_REPEATS

    @property
    def command(self) -> str:
        return command_line(self.module, self.args)

    def record(self, name: str, table: str, notes: str = "") -> None:
        section = (f"## {name}\n\n{datetime.date.today().isoformat()} · {machine()} · `{self.command}`\n\n"
                   f"{table}\n" + (f"\n{notes}\n" if notes else ""))
        print(section)
        if not self.recording:
            why = "--no-record" if self.args.no_record else f"fewer than {MIN_REPEATS} runs"
            print(f"(not recorded in {RESULTS.name}: {why})")
            return
        text = RESULTS.read_text() if RESULTS.exists() else ""
        RESULTS.write_text(replace_section(text, name, section))

    def save_figure(self, fig, name: str) -> Path:
        """Lay out and write a matplotlib figure to bench/out/NAME.png, and say where."""
        folder = OUT_DIR if self.recording else TRIAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path)
        print(f"plot: {path}")
        return path


# --- plots ---------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless; an optional,
    heavy import, hence here and not at module level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def medians(figures: Sequence[Repeated]) -> list[float]:
    return [f.median for f in figures]


def spreads(figures: Sequence[Repeated]) -> list[list[float]]:
    """The min-max range around each median, as matplotlib's ``yerr``/``xerr`` takes it."""
    return [[f.median - f.low for f in figures], [f.high - f.median for f in figures]]


def plot_levels(ax, levels: Sequence[int], series: dict[str, tuple[Sequence[Repeated], str]], xlabel: str) -> None:
    """Images per second against a load level on a log2 axis: a line per series (label: figures
    at each level, colour), each point a median with min-max error bars."""
    for label, (figures, colour) in series.items():
        ax.errorbar(levels, medians(figures), yerr=spreads(figures), marker="o", capsize=3, label=label,
                    color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(levels), [str(level) for level in levels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images per second (median, min-max)")
    ax.legend()
