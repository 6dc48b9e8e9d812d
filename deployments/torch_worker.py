"""Blocking torch work off a replica's event loop: one intra-op thread, one worker thread."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from pipeline.memory import IDLE_BEFORE_RELEASE_S, release_freed_memory

T = TypeVar("T")


def pin_torch_threads() -> None:
    """One intra-op thread per replica: on shared cores two threads per replica ran 2-20x slower."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass


class TorchWorker:
    """One thread that runs this replica's blocking torch work (model loads, and the batched
    stages' forwards), off the event loop.

    One thread, not a pool: work queues in order, and a TextEncoder or VAEDecoder never runs two
    forwards at once on the cores Ray gave it (the Denoiser's forwards run on its engine's own
    thread; its worker only loads models). When the last queued piece of work is done, the
    memory it freed goes back to the OS, so an idle replica holds its weights and not its last
    batch.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self._pending = 0  # calls queued or running; touched on the event loop only

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            self._pending -= 1
            if self._pending == 0:
                loop.call_later(IDLE_BEFORE_RELEASE_S, self._release_if_idle)

    def _release_if_idle(self) -> None:
        if self._pending == 0:  # still idle: work that came in would only allocate it again
            self._pool.submit(release_freed_memory)
