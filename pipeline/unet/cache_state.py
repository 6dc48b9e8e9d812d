"""One request's First Block Cache state: its reference head residual, its last computed steps,
its record."""
from __future__ import annotations

import torch

from pipeline.unet.cache_config import FirstBlockCacheConfig


def extrapolation_weights(steps: list[int], at: int) -> list[float]:
    """Lagrange weights of the values known at ``steps`` for the polynomial through them,
    evaluated at step ``at``: one point holds it (``[1]``), two give the line
    ``p1 + (at - s1) * (p1 - p0) / (s1 - s0)`` (``[-(at-s1)/(s1-s0), 1 + (at-s1)/(s1-s0)]``),
    three the parabola. In step units, so uneven gaps between computed steps are honoured."""
    weights = []
    for j, sj in enumerate(steps):
        w = 1.0
        for m, sm in enumerate(steps):
            if m != j:
                w *= (at - sm) / (sj - sm)
        weights.append(w)
    return weights


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
        # the residual the next step's head is compared with: the last computed step's
        # (rule last_computed) or the previous step's, computed or skipped (accumulated)
        self.prev_residual: torch.Tensor | None = None
        self.accumulated = 0.0  # rule accumulated: the step-to-step diffs since the last computed step
        # the last ``order + 1`` computed steps: (step index, value), oldest first; the value is
        # the noise prediction (reuse) or ``up_blocks output - head output`` (residual)
        self.history: list[tuple[int, torch.Tensor]] = []
        self.consecutive_hits = 0
        self.runs = 0  # runs of skipped steps ended so far (by a computed step)
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

    @property
    def approximation(self) -> torch.Tensor | None:
        """The last computed step's value (noise prediction or tail residual)."""
        return self.history[-1][1] if self.history else None

    @property
    def run_limit(self) -> int | None:
        """How many steps in a row this run of skipped steps may have (None: no limit)."""
        limit = self.config.max_consecutive_hits
        return None if limit is None else limit + self.runs * self.config.run_growth

    def may_skip(self) -> bool:
        """Whether this step could be skipped at all, before looking at the head."""
        limit = self.run_limit
        return (self.prev_residual is not None and bool(self.history)
                and self.config.in_window(self.step_index, self.total_steps)
                and (limit is None or self.consecutive_hits < limit))

    def diff_terms(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean|r - r_prev|`` and ``mean|r_prev|``, still on the device: the caller divides
        them for every request of the batch at once and reads all the quotients in one sync.
        Means in fp32: a half-precision sum over a big latent overflows."""
        prev = self.prev_residual
        return (residual - prev).abs().float().mean(), prev.abs().float().mean()

    def measure(self, diff: float) -> float:
        """What is held against the threshold for a step whose head residual moved ``diff``
        from ``prev_residual``: the diff itself, or (accumulated) the sum so far with it."""
        return self.accumulated + diff if self.config.rule == "accumulated" else diff

    def hits(self, diff: float) -> bool:
        return self.measure(diff) < self.config.threshold

    def extrapolate(self) -> torch.Tensor:
        """This step's value from the last computed ones (``config.order``; see
        ``extrapolation_weights``). Order 0, or one computed step: the last value itself."""
        if len(self.history) == 1 or self.config.order == 0:
            return self.history[-1][1]
        steps = [s for s, _ in self.history]
        weights = extrapolation_weights(steps, self.step_index)
        value = self.history[0][1] * weights[0]
        for w, (_, v) in zip(weights[1:], self.history[1:]):
            value = value + v * w
        return value

    def record_hit(self, residual: torch.Tensor | None = None, diff: float | None = None) -> None:
        """A skipped step. Rule accumulated: its diff joins the sum and its head residual becomes
        the next step's reference."""
        if self.config.rule == "accumulated" and residual is not None and diff is not None:
            self.accumulated += diff
            self.prev_residual = residual
        self.consecutive_hits += 1
        self.decisions.append(True)

    def record_computed(self, residual: torch.Tensor, approximation: torch.Tensor) -> None:
        """A computed step: the reference moves here (rule last_computed: only here, so drift
        accumulates over hits); its value joins the history."""
        self.prev_residual = residual
        self.accumulated = 0.0
        self.history = [*self.history, (self.step_index, approximation)][-(self.config.order + 1):]
        if self.consecutive_hits:
            self.runs += 1
        self.consecutive_hits = 0
        self.decisions.append(False)
