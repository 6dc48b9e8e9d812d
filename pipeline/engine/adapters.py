"""A request's LoRA adapters put on its model before it joins a step, not inside one.

A LoRA set the model does not hold yet is loaded while the request is admitted: its files are
read on a thread of their own while the UNet keeps stepping the other requests, then the
adapters are injected on the UNet's thread between two steps (injecting changes modules that a
forward runs through, so it must not race one). At the step only the cheap activation (the
adapters' weights) remains. Requests that need the same set at the same time share one load; a
set that cannot be loaded fails its own request at admission, before it holds a place in any
batch.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

from pipeline.lora_set import LoraSet
from pipeline.model import DiffusionModel

# Reads the files of what the model lacks of a LoRA set (blocking file work, never on the UNet's
# thread) and returns what injects them, to run on the UNet's thread, or None when the model
# holds them all already (``ModelStore.read_loras``).
ReadAdapters = Callable[[DiffusionModel, LoraSet], Callable[[], object] | None]


class AdapterLoader:
    """Loads LoRA sets for the engine: files on a reader thread, injection on the UNet's."""

    def __init__(self, read: ReadAdapters | None, unet: Executor) -> None:
        self._read = read
        self._unet = unet
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-read")
        self._loading: dict[tuple[int, LoraSet], asyncio.Future[None]] = {}  # (id(model), set)

    async def prepare(self, model: DiffusionModel, adapters: LoraSet) -> None:
        """Returns once ``adapters`` are on ``model`` (at once if nothing to load); raises what
        the load raised. A caller cancelled meanwhile leaves the load running for the others."""
        if not adapters or self._read is None:
            return
        key = (id(model), adapters)  # the model stays alive while its load runs: ids are unique
        load = self._loading.get(key)
        if load is None:
            load = self._loading[key] = asyncio.ensure_future(self._load(model, adapters))
            load.add_done_callback(lambda done: self._forget(key, done))
        await asyncio.shield(load)

    async def _load(self, model: DiffusionModel, adapters: LoraSet) -> None:
        loop = asyncio.get_running_loop()
        inject = await loop.run_in_executor(self._reader, self._read, model, adapters)
        if inject is not None:
            await loop.run_in_executor(self._unet, inject)

    def _forget(self, key: tuple[int, LoraSet], done: asyncio.Future[None]) -> None:
        self._loading.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: its waiters got it, or all of them went away

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
