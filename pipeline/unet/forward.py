"""The plain UNet forward over many requests' rows, each row at its own timestep.

Requests at different steps share a forward: ``UNet2DConditionModel`` takes one timestep per
row. A request adds its rows (uncond and cond under classifier-free guidance, cond alone
without); ``UNetBatch.concat`` is the one place that joins many requests' rows, SDXL's added
conditioning included, and ``UNetBatch.split`` hands each request its slice back, checking the
row count. The caches (``pipeline.unet.first_block_cache``) run this same batch through the
head/tail split instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import UNet2DConditionModel

from pipeline.conditioning import Conditioning
from pipeline.unet.parts import EAGER, UNetParts


@dataclass(frozen=True)
class ConditionRows:
    """One request's conditioning as UNet rows, built once: it does not change between steps."""

    encoder_hidden_states: torch.Tensor  # (rows, tokens, dim)
    text_embeds: torch.Tensor | None = None  # SDXL pooled (rows, dim)
    time_ids: torch.Tensor | None = None  # SDXL (rows, 6)

    @classmethod
    def build(cls, unet: UNet2DConditionModel, conditioning: Conditioning, guided: bool,
              size: tuple[int, int]) -> ConditionRows:
        """(uncond, cond) rows when ``guided``, else (cond,), on the UNet's device and dtype;
        ``size`` (height, width) goes into SDXL's size and crop conditioning."""
        device, dtype = unet.device, unet.dtype
        cond = conditioning.to(device, dtype)
        embeds = [cond.negative_embeds, cond.prompt_embeds] if guided else [cond.prompt_embeds]
        if unet.config.addition_embed_type != "text_time":  # SD1.5: no added conditioning
            return cls(torch.stack(embeds))
        pooled = [cond.negative_pooled, cond.pooled] if guided else [cond.pooled]
        time_ids = torch.tensor([*size, 0, 0, *size], dtype=dtype, device=device)
        return cls(torch.stack(embeds), torch.stack(pooled), time_ids.expand(len(embeds), -1))


@dataclass(frozen=True)
class UNetRows:
    """One request's rows of the next forward."""

    sample: torch.Tensor  # (rows, C, h, w), already scaled by the sampler
    timestep: torch.Tensor  # (rows,)
    condition: ConditionRows

    @property
    def count(self) -> int:
        return self.sample.shape[0]


@dataclass(frozen=True)
class UNetBatch:
    """Many requests' rows joined, in order, as the UNet takes them."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None
    sizes: list[int]  # rows per request

    @classmethod
    def concat(cls, rows: Sequence[UNetRows]) -> UNetBatch:
        cat = torch.cat
        conditions = [r.condition for r in rows]
        added = None
        if conditions[0].time_ids is not None:  # one batch, one model: all rows or none
            added = {"text_embeds": cat([c.text_embeds for c in conditions]),
                     "time_ids": cat([c.time_ids for c in conditions])}
        return cls(cat([r.sample for r in rows]), cat([r.timestep for r in rows]),
                   cat([c.encoder_hidden_states for c in conditions]), added, [r.count for r in rows])

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    @property
    def slices(self) -> list[slice]:
        """Each request's rows in the batch."""
        bounds = [0]
        for size in self.sizes:
            bounds.append(bounds[-1] + size)
        return [slice(start, end) for start, end in zip(bounds, bounds[1:])]

    def split(self, output: torch.Tensor) -> list[torch.Tensor]:
        """Each request's slice of ``output``; a row count that does not add up fails loudly."""
        if output.shape[0] != self.rows:
            raise RuntimeError(f"UNet returned {output.shape[0]} rows for {self.rows} inputs")
        return list(output.split(self.sizes))


@dataclass(frozen=True)
class Forwarded:
    """One batched forward's outputs (per request, in order) and what it cost."""

    outputs: list[torch.Tensor]
    cached: list[bool]  # per request: its step was approximated from its cache this time
    rows: int  # rows that ran the head (all of them)
    tail_rows: int  # rows that ran the whole UNet


@torch.inference_mode()
def forward(unet: UNet2DConditionModel, rows: Sequence[UNetRows],
            parts: UNetParts = EAGER) -> list[torch.Tensor]:
    """One UNet forward over many requests' rows; returns each request's slice, in order.
    ``parts``: the model's (``DiffusionModel.unet_parts``); eager, the UNet's own forward."""
    batch = UNetBatch.concat(rows)
    output = parts.whole(unet, batch.sample, batch.timestep, batch.encoder_hidden_states,
                         batch.added_cond_kwargs)
    return batch.split(output)
