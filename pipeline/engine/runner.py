"""Doing one step for a group: build the batch, run the UNet (each request with its cache),
hand each request its slice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from pipeline.denoise import Trajectory
from pipeline.lora_set import LoraSet
from pipeline.model import DiffusionModel
from pipeline.unet.first_block_cache import FirstBlockCache

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


def run_step(group: Sequence[Trajectory], adapters: LoraSet = (),
             activate_adapters: ActivateAdapters | None = None) -> StepReport:
    """One UNet forward for ``group`` (one batch key: one model, one LoRA set); advances each
    trajectory one step (a trajectory's last step leaves its latents on the CPU, so the copy
    waits on this thread, not on an event loop; each watches its latents for NaN and infinity).

    The batch runs through ``FirstBlockCache.forward``: each request's cache decides for its own
    rows, and a request without one is always computed; with no cache in the group it is the
    plain forward. The row accounting is checked after the forward: a request handed a slice of
    the wrong size fails loudly rather than drawing someone else's picture.
    """
    model = group[0].model
    if activate_adapters is not None:
        activate_adapters(model, adapters)
    rows = [t.unet_rows() for t in group]
    result = FirstBlockCache.forward(model.unet, rows, [t.cache for t in group], model.unet_parts)
    if len(result.outputs) != len(group):
        raise RuntimeError(f"forward returned {len(result.outputs)} slices for {len(group)} requests")
    for i, (trajectory, row, output) in enumerate(zip(group, rows, result.outputs)):
        # the noise prediction has the latents' shape (an inpainting UNet takes 5 more channels)
        if output.shape[0] != row.count or output.shape[2:] != row.sample.shape[2:]:
            raise RuntimeError(f"request {i} of the group: output {tuple(output.shape)} for input "
                               f"{tuple(row.sample.shape)}")
        trajectory.advance(output)
    return StepReport(len(group), result.rows, result.tail_rows, sum(result.cached))
