"""Doing one step for a group: build the batch, run the UNet, hand each request its slice."""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.denoise import UNetRows, forward_unet
from pipeline.engine.request import ActiveRequest
from pipeline.model import DiffusionModel

UNetForward = Callable[[DiffusionModel, list[UNetRows], list[ActiveRequest]], list[torch.Tensor]]


def plain_forward(model: DiffusionModel, rows: list[UNetRows],
                  group: list[ActiveRequest]) -> list[torch.Tensor]:
    return forward_unet(model, rows)


def run_step(model: DiffusionModel, group: list[ActiveRequest],
             forward: UNetForward = plain_forward) -> int:
    """One UNet forward for ``group``; advances each request one step. Returns the rows run.

    The row accounting is checked after the forward: a request handed a slice of the wrong size
    fails loudly rather than drawing someone else's picture.
    """
    rows = [r.job.unet_rows() for r in group]
    outputs = forward(model, rows, group)
    if len(outputs) != len(group):
        raise RuntimeError(f"forward returned {len(outputs)} slices for {len(group)} requests")
    for request, row, output in zip(group, rows, outputs):
        if output.shape[0] != row.count or output.shape[1:] != row.sample.shape[1:]:
            raise RuntimeError(f"request {request.id}: output {tuple(output.shape)} for input "
                               f"{tuple(row.sample.shape)}")
        request.job.advance(output)
        request.forwards += 1
    return sum(row.count for row in rows)
