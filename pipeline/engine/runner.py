"""Doing one step for a group: build the batch, run the UNet (with each request's cache), hand
each request its slice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.engine.request import ActiveRequest
from pipeline.first_block_cache import forward_unet_cached
from pipeline.lora import LoraSet
from pipeline.model import DiffusionModel

# Puts a LoRA set on the model before a forward (e.g. ``AdapterManager.activate``); runs on the
# UNet thread, since switching adapters must not race a forward.
ActivateAdapters = Callable[[DiffusionModel, LoraSet], object]


@dataclass(frozen=True)
class StepReport:
    """What one engine step cost: rows through the head, rows through the whole UNet."""

    requests: int
    rows: int
    tail_rows: int
    cached: int  # requests whose step was approximated from their cache


def run_step(model: DiffusionModel, group: list[ActiveRequest],
             activate_adapters: ActivateAdapters | None = None) -> StepReport:
    """One UNet forward for ``group`` (one batch key: one model, one LoRA set); advances each
    request one step.

    Each request's First Block Cache decides for its own rows (``forward_unet_cached``); with
    every cache off this is exactly ``forward_unet``. The row accounting is checked after the
    forward: a request handed a slice of the wrong size fails loudly rather than drawing someone
    else's picture.
    """
    if activate_adapters is not None:
        activate_adapters(model, group[0].request.adapters)
    rows = [r.job.unet_rows() for r in group]
    result = forward_unet_cached(model, rows, [r.job.cache for r in group])
    if len(result.outputs) != len(group):
        raise RuntimeError(f"forward returned {len(result.outputs)} slices for {len(group)} requests")
    for request, row, output in zip(group, rows, result.outputs):
        if output.shape[0] != row.count or output.shape[1:] != row.sample.shape[1:]:
            raise RuntimeError(f"request {request.id}: output {tuple(output.shape)} for input "
                               f"{tuple(row.sample.shape)}")
        request.job.advance(output)
        request.forwards += 1
    return StepReport(len(group), result.rows, result.tail_rows, sum(result.cached))
