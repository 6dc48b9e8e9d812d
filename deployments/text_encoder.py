"""TextEncoder: prompts to conditioning, many requests per CLIP forward (@serve.batch)."""
from __future__ import annotations

import time
from collections import defaultdict

from ray import serve

from pipeline.conditioning import encode_prompts

from deployments.messages import Encoded, EncodeRequest
from deployments.replica import ModelStore, TorchWorker, pin_torch_threads, placement_report
from deployments.settings import BatchKnobs, StageSettings


@serve.deployment(name="TextEncoder", max_ongoing_requests=32)
class TextEncoder:
    def __init__(self, settings: StageSettings, knobs: BatchKnobs) -> None:
        pin_torch_threads()
        self.store = ModelStore(settings)
        self.worker = TorchWorker()
        self._encode_batch.set_max_batch_size(knobs.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(knobs.batch_wait_timeout_s)

    async def encode(self, request: EncodeRequest) -> Encoded:
        result = await self._encode_batch(request)
        if isinstance(result, BaseException):  # one bad request must not fail its batch-mates
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _encode_batch(self, requests: list[EncodeRequest]) -> list[Encoded | BaseException]:
        return await self.worker.run(self._encode_sync, requests)

    def _encode_sync(self, requests: list[EncodeRequest]) -> list[Encoded | BaseException]:
        results: list[Encoded | BaseException | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_model[request.model].append(i)
        for name, indices in by_model.items():
            start = time.perf_counter()
            try:
                model = self.store.get(name)
                conditionings = encode_prompts(model, [requests[i].prompt for i in indices],
                                               [requests[i].negative_prompt for i in indices])
            except Exception as error:  # noqa: BLE001 - handed back to the requests it belongs to
                for i in indices:
                    results[i] = error
                continue
            ms = (time.perf_counter() - start) * 1000
            for i, conditioning in zip(indices, conditionings):
                results[i] = Encoded(name, conditioning, {"encode": ms})
        return results  # type: ignore[return-value]

    def placement(self) -> dict:
        return placement_report(self.store)
