"""Steady load for fault tests: clients sending ``/v1/generate`` back to back until stopped, each
outcome kept with when it started, so a test can say what happened around a kill or a removal."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx


@dataclass
class Outcome:
    start: float  # time.monotonic() when sent
    seconds: float
    response: httpx.Response | None
    error: str | None = None  # the transport error's class name ("ReadTimeout"...), if any

    @property
    def status(self) -> int | str:
        """The HTTP status, or the transport error's name."""
        return self.response.status_code if self.response is not None else str(self.error)


@dataclass
class Traffic:
    """``clients`` clients posting ``body`` (each with a seed of its own) to ``url``'s
    ``/v1/generate`` until the ``with`` block ends; a request taking ``timeout_s`` counts as
    hung (an ``error``)."""

    url: str
    clients: int
    body: dict[str, Any]
    timeout_s: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Traffic:
        self._pool = ThreadPoolExecutor(self.clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(self.clients)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=self.timeout_s + 30)
        self._pool.shutdown()

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            seed = 1000 * index
            while not self._stop.is_set():
                seed += 1
                start = time.monotonic()
                try:
                    response, error = client.post(
                        "/v1/generate", json={**self.body, "seed": seed}), None
                except httpx.HTTPError as failure:
                    response, error = None, type(failure).__name__
                self.outcomes.append(Outcome(start, time.monotonic() - start, response, error))

    def answered(self) -> int:
        return sum(o.response is not None for o in self.outcomes)

    def successes_since(self, moment: float) -> int:
        return sum(1 for o in self.outcomes if o.start >= moment and o.status == 200)

    def first_success_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the end of the first request sent after it that got 200."""
        ends = [o.start + o.seconds for o in self.outcomes if o.start >= moment and o.status == 200]
        return min(ends) - moment if ends else None


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
             interval_s: float = 0.5) -> None:
    """Polls ``condition`` until it holds; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(interval_s)
