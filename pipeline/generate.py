"""The whole pipeline in one process: prompts in, images out. The deployments split these stages."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.conditioning import encode_prompts
from pipeline.decode import decode_latents
from pipeline.denoise import DenoiseJob, DenoiseParams
from pipeline.first_block_cache import forward_unet_cached
from pipeline.model import DiffusionModel


@dataclass
class Generated:
    pixels: np.ndarray  # (H, W, 3) uint8
    latents: torch.Tensor  # (1, C, h, w), before decoding
    params: DenoiseParams
    steps_computed: int = 0  # UNet steps run in full
    steps_cached: int = 0  # steps First Block Cache skipped


def generate_batch(model: DiffusionModel, prompts: list[str], params: list[DenoiseParams],
                   negative_prompts: list[str | None] | None = None,
                   max_batch_rows: int = 64) -> list[Generated]:
    """Generate one image per prompt, sharing UNet forwards among them.

    Each image keeps its own scheduler, generator and cache state (``DenoiseParams.cache``), so
    its result does not depend on which others it was batched with. Images of different sizes
    are denoised in separate groups.
    """
    negatives = negative_prompts or [None] * len(prompts)
    conditionings = encode_prompts(model, prompts, negatives)
    jobs = [DenoiseJob(model, c, p) for c, p in zip(conditionings, params)]
    while pending := [j for j in jobs if not j.done]:
        shape = pending[0].latents.shape
        group, rows = [], 0
        for job in pending:
            if job.latents.shape == shape and rows + job.rows <= max(max_batch_rows, job.rows):
                group.append(job)
                rows += job.rows
        result = forward_unet_cached(model, [j.unet_rows() for j in group], [j.cache for j in group])
        for job, noise_pred in zip(group, result.outputs):
            job.advance(noise_pred)
    results = []
    for job in jobs:
        pixels = decode_latents(model, job.latents)[0]
        cached = job.cache.steps_cached if job.cache is not None else 0
        results.append(Generated(pixels, job.latents, job.params, job.step_index - cached, cached))
    return results


def generate(model: DiffusionModel, prompt: str, params: DenoiseParams,
             negative_prompt: str | None = None) -> Generated:
    """Encode, denoise and decode one image in this process."""
    return generate_batch(model, [prompt], [params], [negative_prompt])[0]
