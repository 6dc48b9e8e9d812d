"""TextEncoder: prompts to conditioning, many requests per CLIP forward (@serve.batch).

A small LRU of conditionings sits in front of the batch: clients resend the same prompts
(retries, ``n`` > 1 across requests, a UI's "generate again"), and a hit skips CLIP entirely
and returns the very conditioning the first encoding produced. Entries are keyed by the version
of the model's files too, so a checkpoint replaced under the same name is never answered from
its predecessor's conditionings. A request's LoRAs are put on the text encoders before it joins
a batch (files read in a thread), so a batch never waits for a LoRA file; so are the textual
inversion embeddings its prompts name (``embeddings_dir``), read and checked against the model
before it joins, each keyed in the cache by its file's version. Requests of one batch may each
use other embeddings and another clip skip: they still share one forward.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache
from ray import serve

from pipeline.embedding_library import EmbeddingLibrary
from pipeline.errors import InvalidRequestError
from pipeline.lora_set import LoraSet

from deployments import metrics
from deployments.batching import raise_if_error, run_grouped
from deployments.messages import Encoded, EncodeRequest
from deployments.replica import StageReplica
from deployments.settings import BatchKnobs, StageSettings
from deployments.startup import StartupClock

# SD1.5 conditioning is ~0.5 MB in fp32 and SDXL's ~1.3 MB in fp32 (half in fp16): 128 entries
# stay well under a few hundred MB even for SDXL.
DEFAULT_CACHE_SIZE = 128
CACHE_SIZE_KEY = "embedding_cache_size"

if TYPE_CHECKING:
    from pipeline.conditioning import Conditioning
    from pipeline.embeddings import TextEmbedding
    from pipeline.model import DiffusionModel

    EncodeItem = tuple[EncodeRequest, DiffusionModel, dict[str, TextEmbedding]]


class EmbeddingCache:
    """A bounded LRU (``cachetools.LRUCache``) of conditionings keyed by the encode request
    (model, prompt, negative prompt, LoRA set, embeddings with their files' versions, clip
    skip) and the version of the model's files, counting
    its hits and misses.

    Used only on the replica's event loop, so it needs no lock. Capacity 0 turns it off.
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE) -> None:
        self._entries: LRUCache[Hashable, Conditioning] = LRUCache(maxsize=0)
        self.hits = self.misses = 0  # lookups since start
        self.resize(capacity)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def capacity(self) -> int:
        return int(self._entries.maxsize)

    def get(self, key: Hashable) -> Conditioning | None:
        value = self._entries.get(key)  # a hit becomes the most recently used
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: Hashable, value: Conditioning) -> None:
        if self.capacity:  # LRUCache refuses any entry at maxsize 0
            self._entries[key] = value

    def resize(self, capacity: int) -> None:
        """A new capacity, keeping the most recently used entries that fit."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"{CACHE_SIZE_KEY}: must be an integer >= 0 (0: no cache), not {capacity!r}")
        old, self._entries = self._entries, LRUCache(maxsize=capacity)
        while old:
            key, value = old.popitem()  # least recently used first: the newest are put last
            self.put(key, value)


@serve.deployment(name="TextEncoder", max_ongoing_requests=32)
class TextEncoder(StageReplica):
    async def __init__(self, settings: StageSettings, knobs: BatchKnobs,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        clock = StartupClock("TextEncoder")
        from pipeline.embeddings import LoadedEmbeddings  # torch: see deployments.replica

        super().__init__(settings, components=("text_encoders",))
        clock.imported("pipeline.conditioning", "pipeline.prompt_tokens")
        self.cache = EmbeddingCache(cache_size)
        self.embeddings = (LoadedEmbeddings(EmbeddingLibrary(settings.embeddings_dir))
                           if settings.embeddings_dir else None)
        knobs.apply_to(self._encode_batch)
        self._cache_size_changed()
        await self.store.start()
        clock.log()

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
        from pipeline.embeddings import versions  # torch: see deployments.replica
        from pipeline.prompt_tokens import check_encodable

        start = time.perf_counter()
        conditioning = self.cache.get((request, await self.store.version(request.model)))
        if conditioning is not None:
            metrics.inc("raydiance_embedding_cache_lookups", model=request.model, result="hit")
            seconds = time.perf_counter() - start
            metrics.record_stage("encode", request.model, seconds)
            return Encoded(request.model, conditioning, {"encode": seconds * 1000}, request.loras)
        metrics.inc("raydiance_embedding_cache_lookups", model=request.model, result="miss")
        model = await self.get_model(request.model)
        await self._load_loras(model, request.loras)
        embeddings = await self._read_embeddings(request)
        check_encodable(model, request.prompt, request.negative_prompt, embeddings, request.clip_skip)
        result = raise_if_error(await self._encode_batch((request, model, embeddings)))
        # keyed by the files' versions as read (the Ingress saw them a moment earlier)
        key = dataclasses.replace(request, embeddings=versions(embeddings))
        self.cache.put((key, self.store.version_of(model)), result.conditioning)
        self._cache_size_changed()
        metrics.record_stage("encode", request.model, time.perf_counter() - start)
        return result

    async def _load_loras(self, model: DiffusionModel, loras: LoraSet) -> None:
        """``loras`` on the model's text encoders before the request joins a batch: the files
        read in a thread, the injection on the torch thread (a LoRA that cannot be loaded fails
        this request here, alone)."""
        if loras:
            inject = await asyncio.to_thread(self.store.read_loras, model, loras)
            if inject is not None:
                await self.worker.run(inject)

    async def _read_embeddings(self, request: EncodeRequest) -> dict[str, TextEmbedding]:
        """The embeddings the request's prompts name, read in a thread (kept while their files'
        versions hold); a request naming one on a server without ``embeddings_dir`` is refused."""
        if not request.embeddings:
            return {}
        if self.embeddings is None:
            raise InvalidRequestError("prompt", "this server has no embeddings_dir configured")
        return await asyncio.to_thread(self.embeddings.read, request.embeddings, request.prompt,
                                       request.negative_prompt)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _encode_batch(self, items: list[EncodeItem]) -> list[Encoded | Exception]:
        return await self.worker.run(run_grouped, items, lambda item: (id(item[1]), item[0].loras),
                                     self._encode_group)

    def _encode_group(self, items: list[EncodeItem]) -> list[Encoded]:
        """One CLIP forward for requests of one model and LoRA set, on the torch thread."""
        from pipeline.conditioning import encode_prompts  # torch: see deployments.replica

        start = time.perf_counter()
        (first, model, _), requests = items[0], [request for request, _, _ in items]
        self.store.activate_loras(model, first.loras)
        conditionings = encode_prompts(model, [r.prompt for r in requests],
                                       [r.negative_prompt for r in requests],
                                       clip_skip=[r.clip_skip for r in requests],
                                       embeddings=[embeddings for _, _, embeddings in items])
        ms = (time.perf_counter() - start) * 1000
        return [Encoded(first.model, conditioning, {"encode": ms}, first.loras)
                for conditioning in conditionings]

    def stage_stats(self) -> dict[str, Any]:
        """Its embedding cache's size, capacity and lookups."""
        return {"embedding_cache": {"entries": len(self.cache), "capacity": self.cache.capacity,
                                    "hits": self.cache.hits, "misses": self.cache.misses}}
