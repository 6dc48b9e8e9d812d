"""One request denoised alone, as the engine's runner steps it: the reference tests compare with."""
from __future__ import annotations

import torch

from pipeline.conditioning import Conditioning
from pipeline.denoise import Trajectory
from pipeline.request_params import DenoiseParams
from pipeline.engine.runner import run_step
from pipeline.model import DiffusionModel


def denoise(model: DiffusionModel, conditioning: Conditioning, params: DenoiseParams) -> torch.Tensor:
    """Run one request to the end, alone; returns its final latents (1, C, h, w)."""
    trajectory = Trajectory(model, conditioning, params)
    while not trajectory.done:
        run_step([trajectory])
    return trajectory.latents
