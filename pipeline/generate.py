"""The whole pipeline in one process: prompts in, images out. The deployments split these stages."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.conditioning import encode_prompts
from pipeline.vae import decode_latents
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine, EngineResult
from pipeline.init_image import encode_init_images
from pipeline.request_params import SourceImage
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
                   max_batch_rows: int = 64,
                   sources: Sequence[SourceImage | None] | None = None) -> list[Generated]:
    """Generate one image per prompt, sharing UNet forwards among them.

    Denoising runs on a ``DenoiseEngine`` of its own, as in a Denoiser replica: each image keeps
    its own sampler, generator and cache state (``DenoiseParams.cache``), so its result does
    not depend on which others it was batched with. ``sources``: per image, the image it starts
    from (image to image, inpainting; ``DenoiseParams.strength``), or None. Call it where no
    event loop runs.
    """
    negatives = negative_prompts or [None] * len(prompts)
    conditionings = encode_prompts(model, prompts, negatives)
    inits = [None if source is None else encode_init_images(model, [source])[0]
             for source in (sources or [None] * len(prompts))]

    async def denoise_all() -> list[EngineResult]:
        engine = DenoiseEngine(max_batch_rows=max_batch_rows)
        try:
            return await asyncio.gather(*(engine.submit(model, c, p, init=init)
                                          for c, p, init in zip(conditionings, params, inits)))
        finally:
            await engine.close()

    generated = []
    for p, init, result in zip(params, inits, asyncio.run(denoise_all())):
        pixels = decode_latents(model, result.latents)[0]
        pixels = pixels if init is None else init.overlay(pixels)
        generated.append(Generated(pixels, result.latents, p, result.steps_computed,
                                   result.steps_cached))
    return generated


def generate(model: DiffusionModel, prompt: str, params: DenoiseParams,
             negative_prompt: str | None = None) -> Generated:
    """Encode, denoise and decode one image in this process."""
    return generate_batch(model, [prompt], [params], [negative_prompt])[0]
