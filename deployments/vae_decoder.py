"""VAEDecoder: latents to PNG bytes, many requests per VAE forward (@serve.batch).

What arrives is a ``Denoised``: straight from the Denoiser when the Ingress chained the calls
(``decode.remote(denoise.remote(...))``: Ray hands the Denoiser's result to this replica), or,
after a streamed denoising, a ``Denoised`` that crossed the Ingress holding only an ``ObjectRef``
to its latents, which this replica fetches from the object store before batching. Either way the
latents never pass through the Ingress. PNG encoding happens here rather than in the Ingress: the
Ingress stays light and a PNG is smaller to send back than pixels.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import torch
from ray import ObjectRef, serve

from pipeline.decode import decode_latents
from pipeline.images import encode_png
from pipeline.model import DiffusionModel

from deployments import metrics
from deployments.batching import raise_if_error, run_grouped
from deployments.messages import Decoded, Denoised
from deployments.replica import StageReplica
from deployments.settings import BatchKnobs, StageSettings

FETCH_LATENTS_TIMEOUT_S = 60.0
"""How long a referenced latent tensor may take to arrive: it exists once the reference does, so
only a lost Denoiser node or a stuck object store takes this long, and the request then fails."""

DecodeItem = tuple[Denoised, "str | None", DiffusionModel]  # latents at hand, PNG text, the model


@serve.deployment(name="VAEDecoder", max_ongoing_requests=32)
class VAEDecoder(StageReplica):
    async def __init__(self, settings: StageSettings, knobs: BatchKnobs) -> None:
        super().__init__(settings, components=("vae",))
        knobs.apply_to(self._decode_batch)
        await self.store.start()

    async def decode(self, denoised: Denoised, png_parameters: str | None = None) -> Decoded:
        start = time.perf_counter()
        denoised = await self._fetched(denoised)
        model = await self.get_model(denoised.model)
        result = raise_if_error(await self._decode_batch((denoised, png_parameters, model)))
        metrics.record_stage("decode", denoised.model, time.perf_counter() - start)
        metrics.inc("raydiance_images", model=denoised.model)
        return result

    @staticmethod
    async def _fetched(denoised: Denoised) -> Denoised:
        """``denoised`` with its latents here: a referenced tensor is fetched (with a timeout)."""
        if not isinstance(denoised.latents, ObjectRef):
            return denoised
        try:
            latents = await asyncio.wait_for(denoised.latents, FETCH_LATENTS_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the latents did not arrive from the Denoiser within "
                               f"{FETCH_LATENTS_TIMEOUT_S:.0f} s") from None
        return dataclasses.replace(denoised, latents=latents)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _decode_batch(self, items: list[DecodeItem]) -> list[Decoded | Exception]:
        return await self.worker.run(
            run_grouped, items, lambda item: (id(item[2]), tuple(item[0].latents.shape)),
            self._decode_group)

    @staticmethod
    def _decode_group(items: list[DecodeItem]) -> list[Decoded]:
        """One VAE forward for requests of one model and latent shape, on the torch thread."""
        start = time.perf_counter()
        pixels = decode_latents(items[0][2], torch.cat([denoised.latents for denoised, _, _ in items]))
        pngs = [encode_png(image, parameters) for image, (_, parameters, _) in zip(pixels, items)]
        ms = (time.perf_counter() - start) * 1000
        return [Decoded(png, {**denoised.timings, "decode": ms}, denoised.steps_computed,
                        denoised.steps_cached) for png, (denoised, _, _) in zip(pngs, items)]
