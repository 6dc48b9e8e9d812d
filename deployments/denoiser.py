"""Denoiser: conditioning in, final latents out, through the step-batching engine.

One ``pipeline.engine.DenoiseEngine`` per replica: every request this replica holds is denoised
in shared UNet forwards, step by step, each with its own scheduler and First Block Cache;
requests share a forward only with the same model and LoRA set, and the engine puts that set's
adapters on the UNet before each forward. The deployment only loads models and translates
between stage messages and engine requests; when a caller goes away, Serve cancels ``denoise``
and the engine drops the request before its next step.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from ray import serve

from pipeline.denoise import DenoiseParams
from pipeline.engine import DenoiseEngine, EngineRequest

from deployments.messages import Denoised, Encoded, StepProgress
from deployments.metrics import EngineMetrics
from deployments.replica import (ModelStore, TorchWorker, pin_torch_threads, placement_report,
                                 replica_stats)
from deployments.settings import DenoiserKnobs, StageSettings


@serve.deployment(name="Denoiser", max_ongoing_requests=32)
class Denoiser:
    async def __init__(self, settings: StageSettings, knobs: DenoiserKnobs) -> None:
        pin_torch_threads()
        self.store = ModelStore(settings, TorchWorker(), components=("unet",))
        self.get_model = self.store.get  # multiplexed: Serve finds it on the replica
        self.engine = DenoiseEngine(max_batch_rows=knobs.max_batch_rows, observer=EngineMetrics(),
                                    activate_adapters=self.store.activate_loras)
        await self.store.start()

    async def denoise(self, encoded: Encoded, params: DenoiseParams) -> Denoised:
        return await self._denoise(encoded, params)

    async def denoise_stream(self, encoded: Encoded, params: DenoiseParams
                             ) -> AsyncIterator[StepProgress | Denoised]:
        """``denoise`` for a caller that shows progress (``handle.options(stream=True)``): yields
        a ``StepProgress`` after every step, then the ``Denoised``. Closing the stream (the
        caller went away) drops the request before its next step."""
        steps: asyncio.Queue[StepProgress | None] = asyncio.Queue()
        task = asyncio.ensure_future(self._denoise(
            encoded, params, on_step=lambda done, total: steps.put_nowait(StepProgress(done, total))))
        task.add_done_callback(lambda _: steps.put_nowait(None))
        try:
            while (progress := await steps.get()) is not None:
                yield progress
            yield task.result()
        finally:
            task.cancel()

    async def _denoise(self, encoded: Encoded, params: DenoiseParams,
                       on_step: Callable[[int, int], None] | None = None) -> Denoised:
        model = await self.get_model(encoded.model)
        result = await self.engine.submit(model, EngineRequest(
            encoded.conditioning, params, adapters=encoded.loras, on_step=on_step))
        timings = {**encoded.timings, "queue": result.queued_s * 1000,
                   "denoise": result.denoise_s * 1000}
        return Denoised(encoded.model, result.latents, timings,
                        steps_computed=result.steps_computed, steps_cached=result.steps_cached)

    def stats(self) -> dict[str, Any]:
        """This replica's engine counters, for tests and operators: forwards and rows run,
        seconds spent in forwards, requests in flight and cancelled; and what it holds."""
        return {**replica_stats(self.store),
                "forwards": self.engine.forwards, "rows": self.engine.rows,
                "busy_s": self.engine.busy_s, "active": len(self.engine.active),
                "cancelled": self.engine.cancelled}

    def placement(self) -> dict:
        return placement_report(self.store)
