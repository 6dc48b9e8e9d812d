"""VAEDecoder: the VAE stage. Latents to PNG bytes, and init images to latents, many requests
per VAE forward (@serve.batch).

One deployment for both directions: it holds the VAE, and a VAEEncoder beside it would hold a
second copy on the same small card for a forward that runs once per image-to-image request.
An init image is encoded once per request (``encode``, an ``InitImage`` shared by its seeds);
``decode`` then pastes inpainted pixels into the original through the mask.

What arrives is a ``Denoised``: straight from the Denoiser when the caller chained the calls
(``decode.remote(denoise.remote(...))``: Ray hands the Denoiser's result to this replica), or,
after a streamed denoising, one the caller read from the stream and passes on. PNG encoding
happens here rather than in the Ingress: the Ingress stays light and a PNG is smaller to send
back than pixels.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from ray import serve

from pipeline.images import encode_png
from pipeline.request_params import SourceImage

from deployments import metrics
from deployments.batching import raise_if_error, run_grouped
from deployments.messages import Decoded, Denoised
from deployments.replica import StageReplica
from deployments.settings import BatchKnobs, StageSettings
from deployments.startup import StartupClock

if TYPE_CHECKING:
    from pipeline.init_image import InitImage
    from pipeline.model import DiffusionModel

    DecodeItem = tuple[Denoised, str | None, InitImage | None, DiffusionModel]
    """Latents at hand, PNG text, the init image to paste into (inpainting), the model."""
    EncodeItem = tuple[SourceImage, DiffusionModel]


@serve.deployment(name="VAEDecoder", max_ongoing_requests=32)
class VAEDecoder(StageReplica):
    async def __init__(self, settings: StageSettings, knobs: BatchKnobs) -> None:
        clock = StartupClock("VAEDecoder")
        super().__init__(settings, components=("vae",))
        clock.imported("pipeline.vae", "pipeline.init_image", "pipeline.upscale")
        knobs.apply_to(self._decode_batch)
        knobs.apply_to(self._encode_batch)
        await self.store.start()
        clock.log()

    async def decode(self, denoised: Denoised, png_parameters: str | None = None,
                     init: InitImage | None = None) -> Decoded:
        start = time.perf_counter()
        model = await self.get_model(denoised.model)
        result = raise_if_error(await self._decode_batch((denoised, png_parameters, init, model)))
        metrics.record_stage("decode", denoised.model, time.perf_counter() - start)
        metrics.inc("raydiance_images", model=denoised.model)
        return result

    async def upscale(self, denoised: Denoised, width: int, height: int, upscaler: str) -> InitImage:
        """The hires fix's middle: a first pass's latents brought to ``width`` x ``height`` by
        ``upscaler`` (in latent space, or decoded, resized and encoded again)."""
        import torch

        from pipeline.upscale import upscale_for_second_pass

        model = await self.get_model(denoised.model)
        return await self.worker.run(upscale_for_second_pass, model, torch.from_numpy(denoised.latents),
                                     width, height, upscaler)

    async def encode(self, source: SourceImage) -> InitImage:
        """An init image (and its mask) as the latents its denoising starts from."""
        start = time.perf_counter()
        model = await self.get_model(source.model)
        result = raise_if_error(await self._encode_batch((source, model)))
        metrics.record_stage("encode_image", source.model, time.perf_counter() - start)
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _decode_batch(self, items: list[DecodeItem]) -> list[Decoded | Exception]:
        return await self.worker.run(
            run_grouped, items, lambda item: (id(item[3]), tuple(item[0].latents.shape)),
            self._decode_group)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _encode_batch(self, items: list[EncodeItem]) -> list[InitImage | Exception]:
        from pipeline.init_image import encode_init_images

        return await self.worker.run(
            run_grouped, items, lambda item: (id(item[1]), item[0].pixels.shape),
            lambda group: encode_init_images(group[0][1], [source for source, _ in group]))

    @staticmethod
    def _decode_group(items: list[DecodeItem]) -> list[Decoded]:
        """One VAE forward for requests of one model and latent shape, on the torch thread."""
        import torch

        from pipeline.vae import decode_latents

        start = time.perf_counter()
        latents = np.concatenate([item[0].latents for item in items])
        pixels = decode_latents(items[0][3], torch.from_numpy(latents))
        pngs = [encode_png(image if init is None else init.overlay(image), parameters)
                for image, (_, parameters, init, _) in zip(pixels, items)]
        ms = (time.perf_counter() - start) * 1000
        return [Decoded(png, {**item[0].timings, "decode": ms}, item[0].steps_computed,
                        item[0].steps_cached) for png, item in zip(pngs, items)]
