"""The Denoiser engine: step-level continuous batching across requests.

As LLM servers batch tokens, the engine batches denoising steps: each iteration a scheduler
(plain Python over records, no tensors) picks compatible requests, a runner does ONE UNet forward
for all their rows with a per-row timestep and hands each request's ``Trajectory`` its slice, and
finished or abandoned requests leave at once while new ones join at the next step.
"""
from pipeline.engine.loop import DenoiseEngine
from pipeline.engine.observer import EngineObserver
from pipeline.engine.request import EngineResult

__all__ = ["DenoiseEngine", "EngineObserver", "EngineResult"]
