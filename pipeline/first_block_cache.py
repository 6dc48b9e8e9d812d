"""First Block Cache for a UNet, decided per request inside a shared batch.

Every row of a forward runs the head (embeddings, ``conv_in``, ``down_blocks[0]``'s first resnet
and attention). Each request then compares its head residual with the one from its own last
computed step, ``diff = mean|r - r_prev| / mean|r_prev|`` over its cond and uncond rows together,
and skips the rest of the UNet when ``diff < threshold`` (inside its window, under its run limit).
The tail runs only for the rows of requests that missed (gather, run, scatter); a hit is
approximated from the request's last computed step (``FirstBlockCacheConfig.mode``). Because nothing is
decided over the batch, a request gets the same decisions alone or among others (up to the
last-bit differences of a batched forward, ~1e-6, against thresholds of ~0.1).

The engine's contract::

    result = forward_unet_cached(model, [job.unet_rows() for job in group],
                                 [job.cache for job in group])
    for job, noise_pred in zip(group, result.outputs):
        job.advance(noise_pred)
    metrics: result.rows (rows that ran the head), result.tail_rows (rows that ran the whole UNet),
             result.cached[i] (job i's step was skipped); per job cache.steps_computed/steps_cached

A ``CacheState`` counts its own forwards: call ``forward_unet_cached`` exactly once per scheduler
step of its job (all Raydiance samplers take one model evaluation per step); ``DenoiseJob.advance``
checks that the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from pipeline.unet.cache_config import FirstBlockCacheConfig
from pipeline.denoise import UNetRows, forward_unet
from pipeline.model import DiffusionModel
from pipeline.unet_parts import Head, check_supported, run_head, run_out, run_tail


class CacheState:
    """One request's cache: its reference from its last computed step and its counters."""

    def __init__(self, config: FirstBlockCacheConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps
        self.step_index = 0  # forwards seen so far: the step the next forward is for
        self.prev_residual: torch.Tensor | None = None  # head residual of the last computed step
        # residual mode: that step's ``up_blocks output - head output``; reuse: its noise prediction
        self.approximation: torch.Tensor | None = None
        self.consecutive_hits = 0
        self.steps_computed = 0
        self.steps_cached = 0
        self.decisions: list[bool] = []  # per step: True where it was skipped
        self.diffs: list[float | None] = []  # per step: the relative diff, None where not measured

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def may_skip(self) -> bool:
        """Whether this step could be skipped at all, before looking at the head."""
        limit = self.config.max_consecutive_hits
        return (self.enabled and self.prev_residual is not None
                and self.config.in_window(self.step_index, self.total_steps)
                and (limit is None or self.consecutive_hits < limit))

    def relative_diff(self, residual: torch.Tensor) -> float:
        prev = self.prev_residual  # means in fp32: a half-precision sum over a big latent overflows
        return float((residual - prev).abs().float().mean() / prev.abs().float().mean())

    def _finish_step(self, hit: bool, diff: float | None) -> None:
        self.decisions.append(hit)
        self.diffs.append(diff)
        self.step_index += 1

    def record_hit(self, diff: float) -> None:
        self.consecutive_hits += 1
        self.steps_cached += 1
        self._finish_step(True, diff)

    def record_computed(self, diff: float | None, residual: torch.Tensor | None,
                        approximation: torch.Tensor | None) -> None:
        """A computed step: the reference moves here (only here, so drift accumulates over hits)."""
        if self.enabled:
            self.prev_residual, self.approximation = residual, approximation
        self.consecutive_hits = 0
        self.steps_computed += 1
        self._finish_step(False, diff)


@dataclass
class CachedForward:
    """One forward's outputs (per job, in order) and what it cost."""

    outputs: list[torch.Tensor]
    cached: list[bool]  # per job: its step was skipped (approximated) this time
    rows: int  # rows that ran the head (all of them)
    tail_rows: int  # rows that ran the rest of the UNet
    diffs: list[float | None] = field(default_factory=list)


def _added_cond(model: DiffusionModel, batch: list[UNetRows]) -> dict[str, torch.Tensor] | None:
    if model.family != "sdxl":
        return None
    return {"text_embeds": torch.cat([r.text_embeds for r in batch]),
            "time_ids": torch.cat([r.time_ids for r in batch])}


def _count_only(model: DiffusionModel, batch: list[UNetRows],
                caches: list[CacheState | None]) -> CachedForward:
    """No request may skip: the plain forward, exactly ``forward_unet``."""
    outputs = forward_unet(model, batch)
    for cache in caches:
        if cache is not None:
            cache.record_computed(None, None, None)
    rows = sum(r.count for r in batch)
    return CachedForward(outputs, [False] * len(batch), rows, rows, [None] * len(batch))


@torch.inference_mode()
def forward_unet_cached(model: DiffusionModel, batch: list[UNetRows],
                        caches: list[CacheState | None]) -> CachedForward:
    """One UNet forward over many jobs' rows, each job skipping the tail when its cache says so.

    ``caches[i]`` is job ``i``'s state (None: no cache, always computed). When every cache is off
    or no job skips, the result is bitwise ``forward_unet``'s (the split forward does the same ops
    in the same order); otherwise a computed row differs from it only by the last bits that any
    change of batch brings.
    """
    if len(caches) != len(batch):
        raise ValueError(f"{len(batch)} jobs but {len(caches)} cache states")
    if not any(c is not None and c.enabled for c in caches):
        return _count_only(model, batch, caches)
    unet = model.unet
    check_supported(unet)
    sizes = [r.count for r in batch]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    head = run_head(unet, torch.cat([r.sample for r in batch]), torch.cat([r.timestep for r in batch]),
                    torch.cat([r.encoder_hidden_states for r in batch]), _added_cond(model, batch))

    # decide, per job, from its own rows only
    residuals: list[torch.Tensor | None] = []
    diffs: list[float | None] = []
    hits: list[bool] = []
    for i, cache in enumerate(caches):
        residual = diff = None
        if cache is not None and cache.enabled:
            rows = slice(bounds[i], bounds[i + 1])
            residual = head.hidden[rows] - head.stem[rows]
            if cache.may_skip():
                diff = cache.relative_diff(residual)
        residuals.append(residual)
        diffs.append(diff)
        hits.append(diff is not None and diff < cache.config.threshold)

    # the tail, for the rows of the jobs that missed
    miss_rows = [row for i, hit in enumerate(hits) if not hit for row in range(bounds[i], bounds[i + 1])]
    tail_out, tail_head = None, head
    if miss_rows:
        if len(miss_rows) != bounds[-1]:
            tail_head = head.select(torch.tensor(miss_rows, device=head.stem.device))
        tail_out = run_tail(unet, tail_head)
        if tail_out.shape[0] != len(miss_rows):
            raise RuntimeError(f"UNet tail returned {tail_out.shape[0]} rows for {len(miss_rows)} inputs")

    outputs = _scatter(unet, head, tail_out, bounds, hits, caches)
    for i, (out, size) in enumerate(zip(outputs, sizes)):
        if out.shape[0] != size:
            raise RuntimeError(f"job {i} got {out.shape[0]} output rows, expected {size}")

    # commit: only now that the forward succeeded do the states move
    tail_offset = 0
    for i, cache in enumerate(caches):
        size = sizes[i]
        if hits[i]:
            cache.record_hit(diffs[i])
            continue
        if cache is not None:
            approximation = None
            if cache.enabled:
                if cache.config.mode == "residual":
                    rows = slice(bounds[i], bounds[i + 1])
                    approximation = tail_out[tail_offset:tail_offset + size] - head.hidden[rows]
                else:
                    approximation = outputs[i].clone()
            cache.record_computed(diffs[i], residuals[i], approximation)
        tail_offset += size
    return CachedForward(outputs, hits, bounds[-1], len(miss_rows), diffs)


def _scatter(unet: UNet2DConditionModel, head: Head, tail_out: torch.Tensor | None, bounds: list[int], hits: list[bool],
             caches: list[CacheState | None]) -> list[torch.Tensor]:
    """Each job's noise prediction: computed from the tail, or approximated from its cache."""
    if not any(hits):  # every row ran the tail, in order: the output layers over all at once
        out = run_out(unet, tail_out)
        return list(out.split([bounds[i + 1] - bounds[i] for i in range(len(hits))]))
    pieces: list[torch.Tensor] = []  # inputs of the output layers, for the rows that need them
    owners: list[int] = []
    tail_offset = 0
    for i, hit in enumerate(hits):
        size = bounds[i + 1] - bounds[i]
        if not hit:
            pieces.append(tail_out[tail_offset:tail_offset + size])
            tail_offset += size
        elif caches[i].config.mode == "residual":
            pieces.append(head.hidden[bounds[i]:bounds[i + 1]] + caches[i].approximation)
        else:
            continue
        owners.append(i)
    outputs: list[torch.Tensor | None] = [None] * len(hits)
    if pieces:
        out = run_out(unet, torch.cat(pieces))
        for i, piece in zip(owners, out.split([p.shape[0] for p in pieces])):
            outputs[i] = piece
    for i, hit in enumerate(hits):
        if outputs[i] is None:  # reuse: last computed prediction as it is
            outputs[i] = caches[i].approximation.clone()
    return outputs
