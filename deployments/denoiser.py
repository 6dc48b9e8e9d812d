"""Denoiser: conditioning in, final latents out, through a replaceable engine."""
from __future__ import annotations

import time

from ray import serve

from pipeline.denoise import DenoiseParams

from deployments.engine import DenoiseEngine, SequentialEngine
from deployments.messages import Denoised, Encoded
from deployments.replica import ModelStore, TorchWorker, pin_torch_threads, placement_report
from deployments.settings import DenoiserKnobs, StageSettings


def make_engine(knobs: DenoiserKnobs, worker: TorchWorker) -> DenoiseEngine:
    if knobs.engine == "sequential":
        return SequentialEngine(worker)
    raise ValueError(f"denoiser.engine: unknown engine {knobs.engine!r}")


@serve.deployment(name="Denoiser", max_ongoing_requests=16)
class Denoiser:
    def __init__(self, settings: StageSettings, knobs: DenoiserKnobs) -> None:
        pin_torch_threads()
        self.store = ModelStore(settings)
        self.worker = TorchWorker()
        self.engine = make_engine(knobs, self.worker)

    async def denoise(self, encoded: Encoded, params: DenoiseParams) -> Denoised:
        model = self.store.loaded(encoded.model) or await self.worker.run(self.store.get, encoded.model)
        start = time.perf_counter()
        latents = await self.engine.run(model, encoded.conditioning, params)
        timings = {**encoded.timings, "denoise": (time.perf_counter() - start) * 1000}
        return Denoised(encoded.model, latents, timings)

    def placement(self) -> dict:
        return placement_report(self.store)
