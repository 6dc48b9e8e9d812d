"""Denoiser: conditioning in, final latents out, through the step-batching engine.

One ``pipeline.engine.DenoiseEngine`` per replica: every request this replica holds is denoised
in shared UNet forwards, step by step, each with its own scheduler and First Block Cache;
requests share a forward only with the same model and LoRA set, and the engine puts that set's
adapters on the UNet before each forward. The deployment only loads models and translates
between stage messages and engine requests; when a caller goes away, Serve cancels ``denoise``
and the engine drops the request before its next step.
"""
from __future__ import annotations

from ray import serve

from pipeline.denoise import DenoiseParams
from pipeline.engine import DenoiseEngine, EngineRequest
from pipeline.model import DiffusionModel

from deployments.messages import Denoised, Encoded
from deployments.metrics import EngineMetrics
from deployments.replica import (ModelStore, TorchWorker, activate_loras, pin_torch_threads,
                                 placement_report)
from deployments.settings import DenoiserKnobs, StageSettings


@serve.deployment(name="Denoiser", max_ongoing_requests=32)
class Denoiser:
    def __init__(self, settings: StageSettings, knobs: DenoiserKnobs) -> None:
        pin_torch_threads()
        self.store = ModelStore(settings, TorchWorker())
        self.get_model = self.store.get  # multiplexed: Serve finds it on the replica
        self.engine = DenoiseEngine(max_batch_rows=knobs.max_batch_rows, observer=EngineMetrics(),
                                    activate_adapters=self._activate_loras)

    def _activate_loras(self, model: DiffusionModel, loras: tuple[tuple[str, float], ...]) -> None:
        activate_loras(self.store.adapters(model, "unet"), model, loras)

    async def denoise(self, encoded: Encoded, params: DenoiseParams) -> Denoised:
        model = await self.get_model(encoded.model)
        result = await self.engine.submit(model, EngineRequest(encoded.conditioning, params,
                                                               adapters=encoded.loras))
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
