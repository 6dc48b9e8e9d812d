"""VAEDecoder: latents to PNG bytes, many requests per VAE forward (@serve.batch).

PNG encoding happens here rather than in the Ingress: the Ingress stays light and a PNG is
smaller to send back than pixels.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from ray import serve

from pipeline.decode import decode_latents
from pipeline.images import encode_png
from pipeline.model import DiffusionModel

from deployments import metrics
from deployments.messages import Decoded, Denoised
from deployments.replica import (ModelStore, TorchWorker, pin_torch_threads, placement_report,
                                 replica_stats)
from deployments.settings import BatchKnobs, StageSettings


DecodeItem = tuple[Denoised, "str | None", DiffusionModel]  # latents, PNG text, the model


@serve.deployment(name="VAEDecoder", max_ongoing_requests=32)
class VAEDecoder:
    async def __init__(self, settings: StageSettings, knobs: BatchKnobs) -> None:
        pin_torch_threads()
        self.worker = TorchWorker()
        self.store = ModelStore(settings, self.worker, components=("vae",))
        self.get_model = self.store.get  # multiplexed: Serve finds it on the replica
        self._decode_batch.set_max_batch_size(knobs.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(knobs.batch_wait_timeout_s)
        await self.store.start()

    async def decode(self, denoised: Denoised, png_parameters: str | None = None) -> Decoded:
        start = time.perf_counter()
        model = await self.get_model(denoised.model)
        result = await self._decode_batch((denoised, png_parameters, model))
        if isinstance(result, BaseException):
            raise result
        metrics.record_stage("decode", denoised.model, time.perf_counter() - start)
        metrics.inc("raydiance_images", model=denoised.model)
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _decode_batch(self, items: list[DecodeItem]) -> list[Decoded | BaseException]:
        return await self.worker.run(self._decode_sync, items)

    def _decode_sync(self, items: list[DecodeItem]) -> list[Decoded | BaseException]:
        results: list[Decoded | BaseException | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = defaultdict(list)  # one VAE forward per model and shape
        for i, (denoised, _, model) in enumerate(items):
            groups[(id(model), tuple(denoised.latents.shape))].append(i)
        for indices in groups.values():
            start = time.perf_counter()
            model = items[indices[0]][2]
            try:
                pixels = decode_latents(model, torch.cat([items[i][0].latents for i in indices]))
                pngs = [encode_png(p, items[i][1]) for p, i in zip(pixels, indices)]
            except Exception as error:  # noqa: BLE001 - handed back to the requests it belongs to
                for i in indices:
                    results[i] = error
                continue
            ms = (time.perf_counter() - start) * 1000
            for i, png in zip(indices, pngs):
                denoised = items[i][0]
                results[i] = Decoded(png, {**denoised.timings, "decode": ms},
                                     denoised.steps_computed, denoised.steps_cached)
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        """What this replica holds."""
        return replica_stats(self.store)

    def placement(self) -> dict:
        return placement_report(self.store)
