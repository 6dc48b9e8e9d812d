"""A request's LoRA set as a value: what the API validates and groups by, and what every stage
keys its caches on. No torch or diffusers here; applying a set is ``pipeline.lora``.
"""
from __future__ import annotations

from collections.abc import Iterable

LoraSet = tuple[tuple[str, float], ...]
"""Canonical LoRA set: (name, weight) pairs sorted by name, no zero weights, no repeats."""


def normalize_loras(loras: Iterable[tuple[str, float]]) -> LoraSet:
    """One key per effective set: repeated names add up (as applying a LoRA twice would), zero
    weights drop out (they change nothing), order is by name. Use it to group a batch."""
    total: dict[str, float] = {}
    for name, weight in loras:
        total[name] = total.get(name, 0.0) + float(weight)
    return tuple(sorted((name, weight) for name, weight in total.items() if weight != 0.0))
