"""TextEncoder: prompts to conditioning, many requests per CLIP forward (@serve.batch).

A small LRU of conditionings sits in front of the batch: clients resend the same prompts
(retries, ``n`` > 1 across requests, a UI's "generate again"), and a hit skips CLIP entirely
and returns the very conditioning the first encoding produced.
"""
from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from typing import Any

from ray import serve

from pipeline.conditioning import Conditioning, encode_prompts
from pipeline.model import DiffusionModel

from deployments import metrics
from deployments.messages import Encoded, EncodeRequest
from deployments.replica import (ModelStore, TorchWorker, pin_torch_threads, placement_report,
                                 replica_stats)
from deployments.settings import BatchKnobs, StageSettings

# SD1.5 conditioning is ~0.5 MB in fp32 and SDXL's ~1.3 MB in fp32 (half in fp16): 128 entries
# stay well under a few hundred MB even for SDXL.
DEFAULT_CACHE_SIZE = 128
CACHE_SIZE_KEY = "embedding_cache_size"


class EmbeddingCache:
    """A bounded LRU of conditionings keyed by the encode request (model, prompt, negative prompt).

    Used only on the replica's event loop, so it needs no lock. Capacity 0 turns it off.
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE) -> None:
        self._entries: OrderedDict[EncodeRequest, Conditioning] = OrderedDict()
        self.capacity = 0
        self.hits = self.misses = 0  # lookups since start
        self.resize(capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: EncodeRequest) -> Conditioning | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
            self._entries.move_to_end(key)
        return value

    def put(self, key: EncodeRequest, value: Conditioning) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        self._evict()

    def resize(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"{CACHE_SIZE_KEY}: must be an integer >= 0 (0: no cache), not {capacity!r}")
        self.capacity = capacity
        self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


@serve.deployment(name="TextEncoder", max_ongoing_requests=32)
class TextEncoder:
    async def __init__(self, settings: StageSettings, knobs: BatchKnobs,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        pin_torch_threads()
        self.worker = TorchWorker()
        self.store = ModelStore(settings, self.worker, components=("text_encoders",))
        self.get_model = self.store.get  # multiplexed: Serve finds it on the replica
        self.cache = EmbeddingCache(cache_size)
        self._encode_batch.set_max_batch_size(knobs.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(knobs.batch_wait_timeout_s)
        self._cache_size_changed()
        await self.store.start()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config`` (``deployments: - name: TextEncoder user_config:
        {embedding_cache_size: 256}`` in serve_config.yaml), applied without a restart."""
        unknown = set(config or {}) - {CACHE_SIZE_KEY}
        if unknown:
            raise ValueError(f"TextEncoder user_config: unknown key(s) {sorted(unknown)}; "
                             f"known: {CACHE_SIZE_KEY}")
        if CACHE_SIZE_KEY in (config or {}):
            self.cache.resize(config[CACHE_SIZE_KEY])
            self._cache_size_changed()

    def _cache_size_changed(self) -> None:
        metrics.set_gauge("raydiance_embedding_cache_entries", len(self.cache))

    async def encode(self, request: EncodeRequest) -> Encoded:
        start = time.perf_counter()
        conditioning = self.cache.get(request)
        if conditioning is not None:
            metrics.inc("raydiance_embedding_cache_lookups", model=request.model, result="hit")
            seconds = time.perf_counter() - start
            metrics.record_stage("encode", request.model, seconds)
            return Encoded(request.model, conditioning, {"encode": seconds * 1000}, request.loras)
        metrics.inc("raydiance_embedding_cache_lookups", model=request.model, result="miss")
        model = await self.get_model(request.model)
        result = await self._encode_batch((request, model))
        if isinstance(result, BaseException):  # one bad request must not fail its batch-mates
            raise result
        self.cache.put(request, result.conditioning)
        self._cache_size_changed()
        metrics.record_stage("encode", request.model, time.perf_counter() - start)
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _encode_batch(self, items: list[tuple[EncodeRequest, DiffusionModel]]
                            ) -> list[Encoded | BaseException]:
        return await self.worker.run(self._encode_sync, items)

    def _encode_sync(self, items: list[tuple[EncodeRequest, DiffusionModel]]
                     ) -> list[Encoded | BaseException]:
        """One CLIP forward per (model, LoRA set) among the batch, on the torch thread."""
        results: list[Encoded | BaseException | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (request, model) in enumerate(items):
            groups[(id(model), request.loras)].append(i)
        for indices in groups.values():
            start = time.perf_counter()
            request, model = items[indices[0]]
            name, requests = request.model, [items[i][0] for i in indices]
            try:
                self.store.activate_loras(model, request.loras)
                conditionings = encode_prompts(model, [r.prompt for r in requests],
                                               [r.negative_prompt for r in requests])
            except Exception as error:  # noqa: BLE001 - handed back to the requests it belongs to
                for i in indices:
                    results[i] = error
                continue
            ms = (time.perf_counter() - start) * 1000
            for i, conditioning in zip(indices, conditionings):
                results[i] = Encoded(name, conditioning, {"encode": ms}, request.loras)
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        """What this replica holds, and its embedding cache's size, capacity and lookups."""
        return {**replica_stats(self.store), "embedding_cache": {
            "entries": len(self.cache), "capacity": self.cache.capacity,
            "hits": self.cache.hits, "misses": self.cache.misses}}

    def placement(self) -> dict:
        return placement_report(self.store)
