"""The Denoiser's engine interface and the simple engine that implements it now.

A Denoiser replica hands each request to an engine and awaits its final latents. The sequential
engine below runs one UNet forward at a time; the step-level batching engine of a later issue
(many requests per forward) replaces it behind the same ``run`` signature.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Protocol

import torch

from pipeline.conditioning import Conditioning
from pipeline.denoise import DenoiseJob, DenoiseParams, forward_unet
from pipeline.model import DiffusionModel

from deployments.replica import TorchWorker


class DenoiseEngine(Protocol):
    async def run(self, model: DiffusionModel, conditioning: Conditioning,
                  params: DenoiseParams) -> torch.Tensor:
        """Denoise one request to the end; returns its final latents (1, C, h, w) on the CPU.

        Cancelling the awaiting task must stop the request's work at the next step.
        """
        ...


@torch.inference_mode()
def _denoise(model: DiffusionModel, conditioning: Conditioning, params: DenoiseParams,
             cancelled: threading.Event) -> torch.Tensor | None:
    """The whole loop on the torch thread; stops between steps once ``cancelled`` is set."""
    job = DenoiseJob(model, conditioning, params)
    while not job.done:
        if cancelled.is_set():
            return None
        (noise_pred,) = forward_unet(model, [job.unet_rows()])
        job.advance(noise_pred)
    return job.latents.to("cpu")


class SequentialEngine:
    """Requests run one after another on the replica's torch thread, first come first served.

    The whole loop runs in one hop to the torch thread (a hop per step cost measurable time on
    busy cores); a cancelled request (its caller went away) is stopped at its next step by a flag.
    """

    def __init__(self, worker: TorchWorker) -> None:
        self.worker = worker

    async def run(self, model: DiffusionModel, conditioning: Conditioning,
                  params: DenoiseParams) -> torch.Tensor:
        cancelled = threading.Event()
        try:
            latents = await self.worker.run(_denoise, model, conditioning, params, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        assert latents is not None  # only a cancelled run returns None, and it raised above
        return latents
