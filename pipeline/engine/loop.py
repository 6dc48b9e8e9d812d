"""The engine loop: one per Denoiser replica, running UNet steps off the event loop."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.conditioning import Conditioning
from pipeline.denoise import Trajectory
from pipeline.request_params import DenoiseParams
from pipeline.engine.adapters import AdapterLoader, ReadAdapters
from pipeline.engine.observer import EngineObserver, SilentObserver
from pipeline.engine.request import ActiveRequest, EngineResult, OnStep
from pipeline.engine.runner import ActivateAdapters, run_step
from pipeline.engine.scheduler import pick_step_group
from pipeline.init_image import InitImage
from pipeline.lora_set import LoraSet
from pipeline.memory import IDLE_BEFORE_RELEASE_S, release_freed_memory
from pipeline.model import DiffusionModel

logger = logging.getLogger(__name__)


class DenoiseEngine:
    """Denoises many requests at once, step by step.

    ``submit`` is a coroutine: it returns when the request's last step is done. If the caller
    is cancelled (client gone, handle call cancelled), the request leaves the batch at the next
    step and no further UNet work is spent on it. The scheduler sees only ``active`` (records,
    no tensors); each record's ``Trajectory`` is the runner's, handed to it by id.

    LoRAs: ``read_adapters`` loads a request's set at admission (``pipeline.engine.adapters``),
    ``activate_adapters`` puts a group's set on the model before its forward (and loads there
    what is still missing, e.g. without ``read_adapters``). A request whose latents stop being
    finite fails alone, with an ``InvalidRequestError`` naming what to change.
    """

    def __init__(self, *, max_batch_rows: int = 16, observer: EngineObserver | None = None,
                 activate_adapters: ActivateAdapters | None = None,
                 read_adapters: ReadAdapters | None = None) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        self.max_batch_rows = max_batch_rows
        self.observer = observer or SilentObserver()
        self.activate_adapters = activate_adapters
        self.active: list[ActiveRequest] = []
        self._trajectories: dict[int, Trajectory] = {}  # by record id
        self.forwards = 0
        self.rows = 0  # UNet rows run, over all forwards (rows / forwards: the mean batch)
        self.busy_s = 0.0  # seconds spent in forwards (busy_s / uptime: the UNet's utilisation)
        self.cancelled = 0  # requests dropped because their caller went away
        self._worked = False  # forwards ran since the engine last went idle
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet")
        self._adapters = AdapterLoader(read_adapters, self._executor)
        self._task: asyncio.Task | None = None

    async def submit(self, model: DiffusionModel, conditioning: Conditioning, params: DenoiseParams,
                     adapters: LoraSet = (), on_step: OnStep | None = None,
                     init: InitImage | None = None, previews: bool = False) -> EngineResult:
        """Denoise one image, from noise or from ``init`` (image to image, inpainting).
        ``adapters`` names its LoRA set (only equal sets share a forward); ``on_step(done,
        total, preview)`` hears of every step, ``preview`` the image's look so far ((h, w, 3)
        uint8, latent-sized) when ``previews`` is asked for, else None. A LoRA set that cannot be loaded fails here, before the
        request joins any step."""
        loop = asyncio.get_running_loop()
        try:
            await self._adapters.prepare(model, adapters)
            trajectory = await loop.run_in_executor(self._executor, Trajectory, model,
                                                    conditioning, params, init)
        except asyncio.CancelledError:  # the caller left before the request joined a step
            self.cancelled += 1
            self.observer.on_cancelled(model.name)
            raise
        if previews:
            trajectory.previewer = model.configs.latent_rgb
        request = ActiveRequest.admit(model, trajectory, adapters, loop.create_future(), on_step)
        if request.done:  # no step to take (strength 0)
            request.started = time.perf_counter()
            self._trajectories[request.id] = trajectory
            self._finish(request)
            return await request.future
        self._trajectories[request.id] = trajectory
        self.active.append(request)
        self.observer.on_active(len(self.active))
        self._ensure_running()
        self._wake.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # the future is cancelled with the caller: the loop drops it before its next step
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
        """One engine step: drop the abandoned, pick a group, run it; or wait for work."""
        self._drop_cancelled()
        group = pick_step_group(self.active, self.max_batch_rows)
        if group:
            await self._step(group)
        else:
            await self._idle()

    async def _idle(self) -> None:
        """Wait for work; out of it for a while, give the freed activations back to the OS."""
        self._wake.clear()
        if not self._worked:
            await self._wake.wait()
            return
        try:
            await asyncio.wait_for(self._wake.wait(), IDLE_BEFORE_RELEASE_S)
        except asyncio.TimeoutError:
            self._worked = False
            await asyncio.get_running_loop().run_in_executor(self._executor, release_freed_memory)

    async def _step(self, group: list[ActiveRequest]) -> None:
        self._worked = True
        start = time.perf_counter()
        for request in group:
            request.started = request.started or start
        trajectories = [self._trajectories[r.id] for r in group]
        try:
            step = await asyncio.get_running_loop().run_in_executor(
                self._executor, run_step, trajectories, group[0].adapters, self.activate_adapters)
        except Exception as error:  # noqa: BLE001 - fail the group, keep serving the rest
            for request in group:
                self._finish(request, error=error)
            return
        now = time.perf_counter()
        self.forwards += 1
        self.rows += step.rows
        self.busy_s += now - start
        self.observer.on_forward(group[0].model_name, step, now - start)
        for request, trajectory in zip(group, trajectories):
            if trajectory.diverged_at is not None:
                logger.info("request %d diverged after step %d", request.id, trajectory.diverged_at)
                self._finish(request, error=request.diverged(trajectory.diverged_at))
                continue
            request.advance(now, trajectory.preview)
            if request.done:
                self._finish(request)

    def _remove(self, request: ActiveRequest) -> Trajectory | None:
        if request in self.active:
            self.active.remove(request)
        self.observer.on_active(len(self.active))
        return self._trajectories.pop(request.id, None)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.active if r.cancelled or r.future.done()]:
            self._remove(request)
            if request.cancelled:
                self.cancelled += 1
                self.observer.on_cancelled(request.model_name)
        self.observer.on_active(len(self.active))

    def _finish(self, request: ActiveRequest, error: Exception | None = None) -> None:
        trajectory = self._remove(request)
        if request.future.done():
            return
        if error is None:
            try:
                result = request.result(trajectory, time.perf_counter())
            except Exception as failure:  # noqa: BLE001 - an engine bug: fail this request, not hang it
                error = failure
        if error is not None:
            request.future.set_exception(error)
            return
        request.future.set_result(result)
        self.observer.on_finished(request.model_name, result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._adapters.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
