"""The engine loop: one per Denoiser replica, running UNet steps off the event loop."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from pipeline.denoise import DenoiseJob
from pipeline.engine.request import ActiveRequest, EngineRequest, EngineResult
from pipeline.engine.runner import ActivateAdapters, StepReport, run_step
from pipeline.engine.scheduler import pick_step_group
from pipeline.memory import IDLE_BEFORE_RELEASE_S, release_freed_memory
from pipeline.model import DiffusionModel


logger = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """What the engine tells whoever exports metrics (the deployment); all optional no-ops."""

    def on_forward(self, model: str, step: StepReport, seconds: float) -> None: ...

    def on_finished(self, model: str, result: EngineResult) -> None: ...

    def on_cancelled(self, model: str) -> None: ...

    def on_active(self, count: int) -> None: ...


class _Silent:
    def on_forward(self, model: str, step: StepReport, seconds: float) -> None:
        pass

    def on_finished(self, model: str, result: EngineResult) -> None:
        pass

    def on_cancelled(self, model: str) -> None:
        pass

    def on_active(self, count: int) -> None:
        pass


class DenoiseEngine:
    """Denoises many requests at once, step by step.

    ``submit`` is a coroutine: it returns when the request's last step is done. If the caller
    is cancelled (client gone, handle call cancelled), the request leaves the batch at the next
    step and no further UNet work is spent on it.
    """

    def __init__(self, *, max_batch_rows: int = 16, observer: EngineObserver | None = None,
                 activate_adapters: ActivateAdapters | None = None) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        self.max_batch_rows = max_batch_rows
        self.observer = observer or _Silent()
        self.activate_adapters = activate_adapters
        self.active: list[ActiveRequest] = []
        self.forwards = 0
        self.rows = 0  # UNet rows run, over all forwards (rows / forwards: the mean batch)
        self.busy_s = 0.0  # seconds spent in forwards (busy_s / uptime: the UNet's utilisation)
        self.cancelled = 0  # requests dropped because their caller went away
        self._worked = False  # forwards ran since the engine last went idle
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet")
        self._task: asyncio.Task | None = None

    async def submit(self, model: DiffusionModel, request: EngineRequest) -> EngineResult:
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self._executor, DenoiseJob, model, request.conditioning,
                                         request.params)
        active = ActiveRequest(request, model, job, loop.create_future())
        self.active.append(active)
        self.observer.on_active(len(self.active))
        self._ensure_running()
        self._wake.set()
        try:
            return await active.future
        except asyncio.CancelledError:
            active.cancelled = True  # the loop drops it before its next step
            self._wake.set()
            raise

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._iterate()
            except Exception as error:  # noqa: BLE001 - a bug here must not hang every caller
                logger.exception("engine step failed; failing the %d requests in flight", len(self.active))
                for request in list(self.active):
                    self._finish(request, error=error)

    async def _iterate(self) -> None:
        """One engine step: drop the abandoned, pick a group, run it, hand results back."""
        loop = asyncio.get_running_loop()
        self._drop_cancelled()
        group = pick_step_group(self.active, self.max_batch_rows)
        if not group:
            self._wake.clear()
            if self._worked:  # out of work for a while: the freed activations go back to the OS
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_BEFORE_RELEASE_S)
                except asyncio.TimeoutError:
                    self._worked = False
                    await loop.run_in_executor(self._executor, release_freed_memory)
                return
            await self._wake.wait()
            return
        self._worked = True
        now = time.perf_counter()
        for request in group:
            request.started = request.started or now
        model = group[0].model
        try:
            step = await loop.run_in_executor(self._executor, run_step, model, group,
                                              self.activate_adapters)
        except Exception as error:  # noqa: BLE001 - fail the group, keep serving the rest
            for request in group:
                self._finish(request, error=error)
            return
        elapsed = time.perf_counter() - now
        self.forwards += 1
        self.rows += step.rows
        self.busy_s += elapsed
        self.observer.on_forward(model.name, step, elapsed)
        stepped = time.perf_counter()
        for request in group:
            request.last_stepped = stepped
            if request.request.on_step:
                try:
                    request.request.on_step(request.job.step_index, len(request.job.timesteps))
                except Exception:  # noqa: BLE001 - a progress listener must not stop the denoising
                    logger.exception("on_step callback failed")
            if request.job.done:
                self._finish(request)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.active if r.cancelled or r.future.done()]:
            self.active.remove(request)
            if request.cancelled:
                self.cancelled += 1
                self.observer.on_cancelled(request.model.name)
        self.observer.on_active(len(self.active))

    def _finish(self, request: ActiveRequest, error: Exception | None = None) -> None:
        if request in self.active:
            self.active.remove(request)
        self.observer.on_active(len(self.active))
        if request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
            return
        job = request.job
        started = request.started or request.submitted
        result = EngineResult(
            latents=job.latents.detach().to("cpu"),
            steps_computed=job.cache.steps_computed if job.cache else job.step_index,
            steps_cached=job.cache.steps_cached if job.cache else 0,
            cache_decisions=tuple(job.cache.decisions) if job.cache else (False,) * job.step_index,
            queued_s=started - request.submitted,
            denoise_s=time.perf_counter() - started,
        )
        request.future.set_result(result)
        self.observer.on_finished(request.model.name, result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
