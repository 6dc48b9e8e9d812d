"""Denoising: one request's state as an object the engine steps, and the UNet forward over many.

A ``DenoiseJob`` holds everything one request needs between steps: its own scheduler, its own
``torch.Generator``, its latents, conditioning and guidance. ``unet_rows`` gives the rows it adds
to the next UNet forward (uncond and cond when guidance is on); ``advance`` takes back its slice
of the output, applies guidance and steps the scheduler. ``forward_unet`` runs one forward for
the rows of many jobs with a per-row timestep, so requests at different steps share a batch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from pipeline.unet.cache_config import FirstBlockCacheConfig
from pipeline.conditioning import Conditioning
from pipeline.errors import InvalidRequestError
from pipeline.model import DiffusionModel
from pipeline.samplers import DEFAULT_SAMPLER, make_scheduler


@dataclass(frozen=True)
class DenoiseParams:
    """What a request asks of the denoiser."""

    width: int
    height: int
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    cache: FirstBlockCacheConfig | None = None  # First Block Cache; None: off (the API fills family defaults)


@dataclass
class UNetRows:
    """One job's rows of a UNet forward."""

    sample: torch.Tensor  # (rows, C, h, w), already scaled by the scheduler
    timestep: torch.Tensor  # (rows,)
    encoder_hidden_states: torch.Tensor  # (rows, tokens, dim)
    text_embeds: torch.Tensor | None = None  # SDXL pooled (rows, dim)
    time_ids: torch.Tensor | None = None  # SDXL (rows, 6)

    @property
    def count(self) -> int:
        return self.sample.shape[0]


def initial_latents(model: DiffusionModel, params: DenoiseParams,
                    generator: torch.Generator) -> torch.Tensor:
    """The request's starting noise, drawn on the CPU as diffusers' ``randn_tensor`` does."""
    factor = model.vae_scale_factor
    if params.width % factor or params.height % factor:
        raise InvalidRequestError("width", f"width and height must be multiples of {factor}")
    shape = (1, model.latent_channels, params.height // factor, params.width // factor)
    return torch.randn(shape, generator=generator, dtype=model.unet.dtype).to(model.unet.device)


class DenoiseJob:
    """One request's denoising, advanced one step at a time by whoever owns the UNet."""

    def __init__(self, model: DiffusionModel, conditioning: Conditioning, params: DenoiseParams) -> None:
        if params.steps < 1:
            raise InvalidRequestError("steps", "must be at least 1")
        self.params = params
        self.device, self.dtype = model.unet.device, model.unet.dtype  # the UNet's, not the model's
        self.generator = torch.Generator("cpu").manual_seed(params.seed)
        self.scheduler = make_scheduler(params.sampler, model.scheduler_config)
        self.scheduler.set_timesteps(params.steps, device=self.device)
        self.timesteps = self.scheduler.timesteps
        self.latents = initial_latents(model, params, self.generator) * self.scheduler.init_noise_sigma
        self.guided = params.guidance_scale > 1.0
        cond = conditioning.to(self.device, self.dtype)
        embeds = [cond.negative_embeds, cond.prompt_embeds] if self.guided else [cond.prompt_embeds]
        self.encoder_hidden_states = torch.stack(embeds)
        self.text_embeds = self.time_ids = None
        if model.family == "sdxl":
            pooled = [cond.negative_pooled, cond.pooled] if self.guided else [cond.pooled]
            self.text_embeds = torch.stack(pooled)
            size = (params.height, params.width)
            time_ids = torch.tensor([*size, 0, 0, *size], dtype=self.dtype, device=self.device)
            self.time_ids = time_ids.expand(len(embeds), -1)
        step_signature = inspect.signature(self.scheduler.step).parameters
        self._step_kwargs = {"generator": self.generator} if "generator" in step_signature else {}
        if "eta" in step_signature:
            self._step_kwargs["eta"] = 0.0
        self.step_index = 0
        self.cache = None  # pipeline.first_block_cache.CacheState, stepped by forward_unet_cached
        if params.cache is not None:
            from pipeline.first_block_cache import CacheState  # that module imports this one

            self.cache = CacheState(params.cache, len(self.timesteps))

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    def unet_rows(self) -> UNetRows:
        t = self.timesteps[self.step_index]
        sample = torch.cat([self.latents] * self.rows)
        sample = self.scheduler.scale_model_input(sample, t)
        return UNetRows(sample, t.expand(self.rows), self.encoder_hidden_states,
                        self.text_embeds, self.time_ids)

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Apply guidance to this job's rows of the UNet output and step its scheduler."""
        if noise_pred.shape[0] != self.rows:
            raise RuntimeError(f"job got {noise_pred.shape[0]} output rows, expected {self.rows}")
        if self.guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.params.guidance_scale * (cond - uncond)
        t = self.timesteps[self.step_index]
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **self._step_kwargs,
                                           return_dict=False)[0]
        self.step_index += 1
        if self.cache is not None and self.cache.step_index != self.step_index:
            raise RuntimeError(f"cache state at step {self.cache.step_index}, job at {self.step_index}")


@torch.inference_mode()
def forward_unet(model: DiffusionModel, batch: list[UNetRows]) -> list[torch.Tensor]:
    """One UNet forward over the rows of many jobs; returns each job's slice, in order."""
    cat = torch.cat
    added = None
    if model.family == "sdxl":
        added = {"text_embeds": cat([r.text_embeds for r in batch]),
                 "time_ids": cat([r.time_ids for r in batch])}
    output = model.unet(
        cat([r.sample for r in batch]), cat([r.timestep for r in batch]),
        encoder_hidden_states=cat([r.encoder_hidden_states for r in batch]),
        added_cond_kwargs=added, return_dict=False,
    )[0]
    sizes = [r.count for r in batch]
    if output.shape[0] != sum(sizes):
        raise RuntimeError(f"UNet returned {output.shape[0]} rows for {sum(sizes)} inputs")
    return list(output.split(sizes))


def denoise(model: DiffusionModel, conditioning: Conditioning, params: DenoiseParams) -> torch.Tensor:
    """Run one request to the end, alone; returns its final latents (1, C, h, w)."""
    from pipeline.first_block_cache import forward_unet_cached  # that module imports this one

    job = DenoiseJob(model, conditioning, params)
    while not job.done:
        (noise_pred,) = forward_unet_cached(model, [job.unet_rows()], [job.cache]).outputs
        job.advance(noise_pred)
    return job.latents
