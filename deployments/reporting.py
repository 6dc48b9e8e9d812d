"""Work that reports as it goes, read as a stream: the reports as they come, then the result.

A stage's method that streams progress (the Denoiser's steps) and the HTTP layer that forwards
it (server-sent events) both run one coroutine that reports through a callback; this turns that
into an async iteration, and cancels the work when the reader stops (a client gone, a stream
closed), so no compute is spent on work nobody will read.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
Report = Callable[[T], None]
_DONE = object()


class ReportingTask(Generic[T, R]):
    """``async with ReportingTask(lambda report: work(on_progress=report)) as task:
    async for item in task.reports(): ...; result = task.result()``."""

    def __init__(self, work: Callable[[Report[T]], Awaitable[R]]) -> None:
        self._work = work
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Future[R] | None = None

    async def __aenter__(self) -> ReportingTask[T, R]:
        self._task = asyncio.ensure_future(self._work(self._queue.put_nowait))
        self._task.add_done_callback(lambda _: self._queue.put_nowait(_DONE))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()  # a no-op once it finished; stops it if the reader went away

    async def reports(self) -> AsyncIterator[T]:
        """Each report as it is made, until the work ends (successfully or not)."""
        while (item := await self._queue.get()) is not _DONE:
            yield item  # type: ignore[misc]

    def result(self) -> R:
        """The work's result, or its exception; call after ``reports()`` is exhausted."""
        assert self._task is not None and self._task.done(), "read reports() to the end first"
        return self._task.result()
