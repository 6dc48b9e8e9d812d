"""The Denoiser's sequential engine, without Ray: same latents as the pipeline, and cancellation."""
from __future__ import annotations

import asyncio
import time

import torch

from deployments.engine import SequentialEngine
from deployments.replica import TorchWorker
from pipeline.conditioning import encode_prompts
from pipeline.denoise import DenoiseParams, denoise


def test_engine_matches_pipeline_and_stops_a_cancelled_request(builtin_model):
    (conditioning,) = encode_prompts(builtin_model, ["a red circle on a blue background"], [None])
    params = DenoiseParams(64, 64, steps=4, seed=3)
    engine = SequentialEngine(TorchWorker())

    async def scenario() -> tuple[torch.Tensor, float]:
        latents = await engine.run(builtin_model, conditioning, params)
        long = asyncio.create_task(engine.run(builtin_model, conditioning,
                                              DenoiseParams(64, 64, steps=5000, seed=1)))
        await asyncio.sleep(0.3)
        long.cancel()
        start = time.perf_counter()
        await engine.run(builtin_model, conditioning, params)  # queued behind the cancelled one
        return latents, time.perf_counter() - start

    latents, after_cancel_s = asyncio.run(scenario())
    assert torch.equal(latents, denoise(builtin_model, conditioning, params))
    assert after_cancel_s < 30  # 5000 steps would take minutes: the cancelled job stopped
