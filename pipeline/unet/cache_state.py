"""One request's First Block Cache state: its reference from its last computed step, its record."""
from __future__ import annotations

import torch

from pipeline.unet.cache_config import FirstBlockCacheConfig


class CacheState:
    """What one request's cache remembers between its steps.

    It counts its own forwards: the cache's forward is called exactly once per UNet evaluation
    of its request (a "step" here: second-order samplers such as Heun evaluate twice per sampler
    step, so ``total_steps`` is the length of the request's timesteps), and the request checks
    after each step that the two counts agree.
    """

    def __init__(self, config: FirstBlockCacheConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps
        self.prev_residual: torch.Tensor | None = None  # head residual of the last computed step
        # residual mode: that step's ``up_blocks output - head output``; reuse: its noise prediction
        self.approximation: torch.Tensor | None = None
        self.consecutive_hits = 0
        self.decisions: list[bool] = []  # per step so far: True where it was skipped

    @property
    def step_index(self) -> int:
        """Forwards seen so far: the step the next forward is for."""
        return len(self.decisions)

    @property
    def steps_cached(self) -> int:
        return sum(self.decisions)

    @property
    def steps_computed(self) -> int:
        return self.step_index - self.steps_cached

    def may_skip(self) -> bool:
        """Whether this step could be skipped at all, before looking at the head."""
        limit = self.config.max_consecutive_hits
        return (self.prev_residual is not None
                and self.config.in_window(self.step_index, self.total_steps)
                and (limit is None or self.consecutive_hits < limit))

    def diff_terms(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean|r - r_prev|`` and ``mean|r_prev|``, still on the device: the caller divides
        them for every request of the batch at once and reads all the quotients in one sync.
        Means in fp32: a half-precision sum over a big latent overflows."""
        prev = self.prev_residual
        return (residual - prev).abs().float().mean(), prev.abs().float().mean()

    def record_hit(self) -> None:
        self.consecutive_hits += 1
        self.decisions.append(True)

    def record_computed(self, residual: torch.Tensor, approximation: torch.Tensor) -> None:
        """A computed step: the reference moves here (only here, so drift accumulates over hits)."""
        self.prev_residual, self.approximation = residual, approximation
        self.consecutive_hits = 0
        self.decisions.append(False)
