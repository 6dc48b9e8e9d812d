"""Denoiser: conditioning in, final latents out, through the step-batching engine.

One ``pipeline.engine.DenoiseEngine`` per replica: every request this replica holds is denoised
in shared UNet forwards, step by step, each with its own scheduler and First Block Cache. The
deployment only loads models (off the event loop) and translates between stage messages and
engine requests; when a caller goes away, Serve cancels ``denoise`` and the engine drops the
request before its next step.
"""
from __future__ import annotations

from ray import serve

from pipeline.denoise import DenoiseParams
from pipeline.engine import DenoiseEngine, EngineRequest

from deployments.messages import Denoised, Encoded
from deployments.replica import ModelStore, TorchWorker, pin_torch_threads, placement_report
from deployments.settings import DenoiserKnobs, StageSettings


@serve.deployment(name="Denoiser", max_ongoing_requests=32)
class Denoiser:
    def __init__(self, settings: StageSettings, knobs: DenoiserKnobs) -> None:
        pin_torch_threads()
        self.store = ModelStore(settings)
        self.worker = TorchWorker()
        self.engine = DenoiseEngine(max_batch_rows=knobs.max_batch_rows)  # metrics: wired with issue 6

    async def denoise(self, encoded: Encoded, params: DenoiseParams) -> Denoised:
        model = self.store.loaded(encoded.model) or await self.worker.run(self.store.get, encoded.model)
        result = await self.engine.submit(model, EngineRequest(encoded.conditioning, params))
        timings = {**encoded.timings, "queue": result.queued_s * 1000,
                   "denoise": result.denoise_s * 1000}
        return Denoised(encoded.model, result.latents, timings,
                        steps_computed=result.steps_computed, steps_cached=result.steps_cached)

    def stats(self) -> dict[str, int]:
        """The engine's counters, for tests and operators: forwards run, requests in flight."""
        return {"forwards": self.engine.forwards, "active": len(self.engine.active),
                "cancelled": self.engine.cancelled}

    def placement(self) -> dict:
        return placement_report(self.store)
