"""First Block Cache as a strategy of the batched UNet forward, decided per request.

Like diffusers' ``apply_first_block_cache(module, config)``, a request's cache is its config;
unlike it, the state is per request, not per module, so requests with different caches (or none)
share a forward. Every row runs the head (embeddings, ``conv_in``, ``down_blocks[0]``'s first
resnet and attention). Each request then compares its head residual with its reference,
``diff = mean|r - r_prev| / mean|r_prev|`` over its cond and uncond rows together (``r_prev``:
its last computed step's residual, or with ``rule`` accumulated the previous step's, the diffs
summed since the last computed step), and skips the rest of the UNet when that is under its
threshold (inside its window, under its run limit). The tail runs only for the rows of requests
that missed (gather, run, scatter); a hit is approximated from the request's last computed steps
(``FirstBlockCacheConfig.mode`` and ``order``: held or extrapolated). All
requests' diffs are divided on the device and read in one sync per step, not one per request.
Because nothing is decided over the batch, a request gets the same decisions alone or among
others (up to the last-bit differences of a batched forward, ~1e-6, against thresholds of ~0.1).

The runner's contract::

    state = FirstBlockCache(config).new_state(steps)      # per request, at admission; None: no cache
    result = FirstBlockCache.forward(unet, rows, states, parts)  # per step, for the whole batch
    # parts: the model's UNetParts (pipeline.unet.parts: eager; pipeline.unet.compiled)
    result.outputs[i]: request i's noise prediction; result.cached[i]: its step was skipped
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import UNet2DConditionModel

from pipeline.unet.cache_config import FirstBlockCacheConfig
from pipeline.unet.cache_state import CacheState
from pipeline.unet.forward import Forwarded, UNetBatch, UNetRows, forward as plain_forward
from pipeline.unet.parts import EAGER, UNetParts
from pipeline.unet.split import Head, check_supported

States = Sequence[CacheState | None]


@dataclass(frozen=True)
class FirstBlockCache:
    """The strategy: a request's config, its per-request state, one forward for the batch."""

    config: FirstBlockCacheConfig

    def new_state(self, steps: int) -> CacheState | None:
        """A request's state for ``steps`` steps; None where the config never skips (threshold
        0): such a request's rows are always computed, exactly as by the plain forward."""
        return CacheState(self.config, steps) if self.config.enabled else None

    @staticmethod
    @torch.inference_mode()
    def forward(unet: UNet2DConditionModel, rows: Sequence[UNetRows], states: States,
                parts: UNetParts = EAGER) -> Forwarded:
        """One UNet forward over many requests' rows, each skipping the tail when its cache says so.

        ``states[i]`` is request ``i``'s (None: no cache, always computed). When no request has a
        state, or none skips, the result is bitwise the plain forward's (the split forward does
        the same ops in the same order); otherwise a computed row differs from it only by the
        last bits that any change of batch brings. The states move only once the forward has
        succeeded.
        """
        if len(states) != len(rows):
            raise ValueError(f"{len(rows)} requests but {len(states)} cache states")
        parts.begin_step()  # the model's parts (eager, or compiled: pipeline.unet.compiled)
        if all(state is None for state in states):
            total = sum(r.count for r in rows)
            return Forwarded(plain_forward(unet, rows, parts), [False] * len(rows), total, total)
        check_supported(unet)
        batch = UNetBatch.concat(rows)
        head = parts.head(unet, batch.sample, batch.timestep, batch.encoder_hidden_states,
                        batch.added_cond_kwargs)
        spans = batch.slices
        residuals, hits, diffs = _decide(head, spans, states)
        tail_out = _run_tail(parts, unet, head, spans, hits)
        outputs = _scatter(parts, unet, head, tail_out, spans, hits, states)
        for i, (out, size) in enumerate(zip(outputs, batch.sizes)):
            if out.shape[0] != size:
                raise RuntimeError(f"request {i} got {out.shape[0]} output rows, expected {size}")
        _commit(states, hits, diffs, residuals, head, tail_out, outputs, spans)
        tail_rows = 0 if tail_out is None else tail_out.shape[0]
        return Forwarded(outputs, hits, batch.rows, tail_rows)


def _decide(head: Head, spans: list[slice], states: States
            ) -> tuple[list[torch.Tensor | None], list[bool], list[float | None]]:
    """Each request's head residual, whether it skips and its measured diff, from its own rows
    only.

    Every request's diff is computed on the device and all are read in ONE sync, then held
    against each request's own threshold here (``CacheState.hits``: by its own rule).
    """
    residuals: list[torch.Tensor | None] = []
    measured: list[int] = []
    terms: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, state in enumerate(states):
        residual = None
        if state is not None:
            residual = head.hidden[spans[i]] - head.stem[spans[i]]
            if state.may_skip():
                measured.append(i)
                terms.append(state.diff_terms(residual))
        residuals.append(residual)
    hits = [False] * len(states)
    diffs: list[float | None] = [None] * len(states)
    if terms:
        numerators, denominators = zip(*terms)
        quotients = (torch.stack(numerators) / torch.stack(denominators)).tolist()
        for i, diff in zip(measured, quotients):
            diffs[i] = diff
            hits[i] = states[i].hits(diff)
    return residuals, hits, diffs


def _run_tail(parts: UNetParts, unet: UNet2DConditionModel, head: Head, spans: list[slice],
              hits: list[bool]) -> torch.Tensor | None:
    """The rest of the UNet for the rows of the requests that missed, in order (None: all hit)."""
    missed = [span for span, hit in zip(spans, hits) if not hit]
    if not missed:
        return None
    tail_head = head if len(missed) == len(spans) else head.select(missed)
    tail_out = parts.tail(unet, tail_head)
    rows = sum(span.stop - span.start for span in missed)
    if tail_out.shape[0] != rows:
        raise RuntimeError(f"UNet tail returned {tail_out.shape[0]} rows for {rows} inputs")
    return tail_out


def _scatter(parts: UNetParts, unet: UNet2DConditionModel, head: Head,
             tail_out: torch.Tensor | None, spans: list[slice], hits: list[bool], states: States) -> list[torch.Tensor]:
    """Each request's noise prediction: computed from the tail, or approximated from its cache."""
    if not any(hits):  # every row ran the tail, in order: the output layers over all at once
        return list(parts.out(unet, tail_out).split([s.stop - s.start for s in spans]))
    pieces: list[torch.Tensor] = []  # inputs of the output layers, for the rows that need them
    owners: list[int] = []
    tail_offset = 0
    for i, (span, hit) in enumerate(zip(spans, hits)):
        size = span.stop - span.start
        if not hit:
            pieces.append(tail_out[tail_offset:tail_offset + size])
            tail_offset += size
        elif states[i].config.mode == "residual":
            pieces.append(head.hidden[span] + states[i].extrapolate())
        else:
            continue
        owners.append(i)
    outputs: list[torch.Tensor | None] = [None] * len(hits)
    if pieces:
        out = parts.out(unet, torch.cat(pieces))
        for i, piece in zip(owners, out.split([p.shape[0] for p in pieces])):
            outputs[i] = piece
    for i, output in enumerate(outputs):
        if output is None:  # reuse: from the last computed predictions (order 0: the last as it is)
            outputs[i] = states[i].extrapolate().clone()
    return outputs


def _commit(states: States, hits: list[bool], diffs: list[float | None],
            residuals: list[torch.Tensor | None], head: Head,
            tail_out: torch.Tensor | None, outputs: list[torch.Tensor], spans: list[slice]) -> None:
    """Move each request's state by its decision; only now that the forward has succeeded."""
    tail_offset = 0
    for i, (state, span) in enumerate(zip(states, spans)):
        if hits[i]:
            state.record_hit(residuals[i], diffs[i])
            continue
        size = span.stop - span.start
        if state is not None:
            if state.config.mode == "residual":
                approximation = tail_out[tail_offset:tail_offset + size] - head.hidden[span]
            else:
                approximation = outputs[i].clone()
            state.record_computed(residuals[i], approximation)
        tail_offset += size
