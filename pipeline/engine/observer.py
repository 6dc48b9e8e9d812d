"""What the engine tells whoever exports its metrics (the Denoiser deployment)."""
from __future__ import annotations

from typing import Protocol

from pipeline.engine.request import EngineResult
from pipeline.engine.runner import StepReport


class EngineObserver(Protocol):
    """Called on the event loop's thread; each call must be quick."""

    def on_forward(self, model: str, step: StepReport, seconds: float) -> None: ...

    def on_finished(self, model: str, result: EngineResult) -> None: ...

    def on_cancelled(self, model: str) -> None: ...

    def on_active(self, count: int) -> None: ...


class SilentObserver:
    """The observer of an engine nobody watches."""

    def on_forward(self, model: str, step: StepReport, seconds: float) -> None:
        pass

    def on_finished(self, model: str, result: EngineResult) -> None:
        pass

    def on_cancelled(self, model: str) -> None:
        pass

    def on_active(self, count: int) -> None:
        pass
