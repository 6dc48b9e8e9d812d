"""The Denoiser engine: step-level continuous batching across requests.

As LLM servers batch tokens, the engine batches denoising steps: each iteration a scheduler
(plain Python, no tensors) picks compatible requests, a runner does ONE UNet forward for all their
rows with a per-row timestep and hands each request its slice, and finished or abandoned requests
leave at once while new ones join at the next step.
"""
from pipeline.engine.loop import DenoiseEngine, EngineObserver
from pipeline.engine.request import EngineRequest, EngineResult

__all__ = ["DenoiseEngine", "EngineObserver", "EngineRequest", "EngineResult"]
