"""The JobQueue deployment: jobs (their registry, their images, their order) live here, in Ray.

One replica, so that every Ingress replica answers for every job, and so that there is one
admission order: at most ``max_running`` jobs are in the Denoisers at once, the rest wait first
in, first out, and a queued job's position is the number waiting ahead of it. The replica runs
each job itself (through the same ``Serving`` fan-out as the synchronous API, so a job's image
equals ``/v1/generate``'s), keeps its progress and latest preview, and tells watchers (the
Ingress's ``/events`` streams) of every change.

Its state is memory only: if this replica dies, Serve starts another, empty. Jobs known to the
old one read as not found. The ones it was running are not cancelled (Ray does not cancel the
calls of a caller that died): the Denoisers finish their remaining steps and the result goes
nowhere, a bounded waste. Clients resubmit; what a job is, is in its request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.images import encode_png, png_base64

from deployments import metrics
from deployments.api.errors import ApiError, error_body, internal_error_body
from deployments.api.faults import translate
from deployments.api.generation import Generation
from deployments.api.serving import Serving, Stages
from deployments.job_store import FINISHED, Job, JobImage, JobStatus, JobStore, QueueFull
from deployments.messages import Decoded, StepProgress
from deployments.settings import JobSettings
from deployments.startup import StartupClock

logger = logging.getLogger("ray.serve")
SWEEP_S = 5.0  # how often expired jobs are dropped and the gauges set when nothing else happens
Event = tuple[str, dict[str, Any]]  # (name, data), as the events stream sends them


@serve.deployment(name="JobQueue", num_replicas=1, max_ongoing_requests=4096)
class JobQueue:
    async def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle,
                 vae_decoder: DeploymentHandle, settings: JobSettings, timeout_s: float) -> None:
        clock = StartupClock("JobQueue")
        self.serving = Serving(Stages(text_encoder, denoiser, vae_decoder), timeout_s)
        self.settings = settings
        self.store = JobStore(settings.ttl_s, settings.max_queued, settings.max_jobs,
                              settings.image_bytes)
        self.pending: dict[str, Generation] = {}  # queued jobs' requests
        self.running: dict[str, asyncio.Task] = {}
        self.watchers: dict[str, set[asyncio.Queue[Event]]] = {}
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        clock.log()

    # --- what the Ingress calls --------------------------------------------------------------

    async def submit(self, generation: Generation) -> dict[str, Any] | None:
        """The new job's view, or None when the queue is full."""
        try:
            job = self.store.submit(generation.steps, generation.count)
        except QueueFull:
            return None
        self.pending[job.id] = generation
        self._admit()
        return self._view(job)

    async def store_images(self, images: list[Decoded], seeds: list[int]) -> dict[str, Any]:
        """Images made elsewhere (the OpenAI API's ``response_format: url``) kept as a finished
        job, under the same TTL and byte budget, so that their URLs can be fetched."""
        job = self.store.keep([_image(d, seed) for d, seed in zip(images, seeds)])
        self._record()
        return self._view(job)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get(job_id)
        return None if job is None else self._view(job)

    async def listing(self, status: JobStatus | None, limit: int) -> list[dict[str, Any]]:
        positions = self.store.positions()
        return [job.view(positions.get(job.id)) for job in self.store.listing(status, limit)]

    async def image(self, job_id: str, index: int) -> bytes | None:
        job = self.store.get(job_id)
        if job is None or job.status != "succeeded" or not 0 <= index < len(job.images):
            return None
        return job.images[index].png

    async def preview(self, job_id: str) -> bytes | None:
        """A PNG of the job's latest step (latent-sized), None before its first step."""
        job = self.store.get(job_id)
        if job is None or job.preview is None:
            return None
        return encode_png(job.preview)

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancels the job: a queued one never starts, a running one leaves the Denoiser at its
        next step. Idempotent: a finished job is left as it is."""
        job = self.store.get(job_id)
        if job is None:
            return None
        if self.store.cancel(job):
            self.pending.pop(job.id, None)
            task = self.running.pop(job.id, None)
            if task is not None:
                task.cancel()
            self._finished(job, "cancelled", {})
            self._admit()
        return self._view(job)

    async def events(self, job_id: str, previews: bool = False) -> AsyncIterator[Event]:
        """The job's events from now on: first where it stands (``queued`` with its position,
        ``running``, the last ``step``), then each change, up to the one that ends it. With
        ``previews``, a step event carries the job's look then (``preview``, a base64 PNG)."""
        job = self.store.get(job_id)
        if job is None:
            return
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.watchers.setdefault(job_id, set()).add(inbox)
        try:
            for event in self._current(job):
                yield self._with_preview(job, event) if previews else event
                if event[0] in FINISHED:
                    return
            while True:
                event = await inbox.get()
                yield self._with_preview(job, event) if previews else event
                if event[0] in FINISHED:
                    return
        finally:
            watchers = self.watchers.get(job_id)
            if watchers is not None:
                watchers.discard(inbox)
                if not watchers:
                    del self.watchers[job_id]

    # --- running the jobs ------------------------------------------------------------------

    def _admit(self) -> None:
        """Starts queued jobs, in order, while fewer than ``max_running`` run."""
        started = False
        while len(self.running) < self.settings.max_running:
            job = self.store.next_queued()
            if job is None:
                break
            started = True
            metrics.observe("raydiance_job_queue_seconds", time.monotonic() - job.queued_at)
            generation = self.pending.pop(job.id)
            self.running[job.id] = asyncio.get_running_loop().create_task(self._run(job, generation))
            self._publish(job, ("running", {"started": job.started}))
        if started:  # everyone still waiting moved up
            for job_id, position in self.store.positions().items():
                self._publish(self.store.jobs[job_id], ("queued", {"position": position}))
        self._record()

    async def _run(self, job: Job, generation: Generation) -> None:
        def on_step(image: int, progress: StepProgress) -> None:
            self.store.step(job, image, progress.step, progress.steps, progress.preview)
            self._publish(job, _step_event(job))

        try:
            decoded = await self.serving.generate(generation, on_step=on_step, previews=True)
        except asyncio.CancelledError:
            return  # DELETE: the store already says cancelled
        except Exception as error:  # noqa: BLE001 - a job's failure is its answer, not ours
            self.store.fail(job, _error(error))
            self._finished(job, "failed", {"error": job.error})
        else:
            self.store.succeed(job, [_image(d, s) for d, s in zip(decoded, generation.seeds())])
            self._finished(job, "succeeded", {"images": [i.summary() for i in job.images]})
        finally:
            if self.running.get(job.id) is asyncio.current_task():
                del self.running[job.id]
            self._admit()

    def _finished(self, job: Job, status: str, data: dict[str, Any]) -> None:
        metrics.inc("raydiance_jobs_finished", status=status)
        self._publish(job, (status, data))
        self._record()

    # --- telling -----------------------------------------------------------------------------

    def _view(self, job: Job) -> dict[str, Any]:
        return job.view(self.store.position(job))

    def _current(self, job: Job) -> list[Event]:
        if job.status == "queued":
            return [("queued", {"position": self.store.position(job)})]
        events: list[Event] = [("running", {"started": job.started})]
        if job.step:
            events.append(_step_event(job))
        if job.status == "succeeded":
            events.append(("succeeded", {"images": [i.summary() for i in job.images]}))
        elif job.done:
            events.append((job.status, {"error": job.error} if job.error else {}))
        return events

    @staticmethod
    def _with_preview(job: Job, event: Event) -> Event:
        name, data = event
        if name != "step" or job.preview is None:
            return event
        return name, {**data, "preview": png_base64(job.preview)}

    def _publish(self, job: Job, event: Event) -> None:
        for inbox in self.watchers.get(job.id, ()):
            inbox.put_nowait(event)

    def _record(self) -> None:
        for status, count in self.store.counts().items():
            metrics.set_gauge("raydiance_jobs", count, status=status)
        metrics.set_gauge("raydiance_job_image_bytes", self.store.stored_bytes)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.store.expire()
            self._record()

    async def check_health(self) -> None:
        if self._sweeper.done():
            raise RuntimeError("the job registry's sweeper stopped")


def _step_event(job: Job) -> Event:
    return "step", {"step": job.step, "steps": job.step_total, "image": job.image,
                    "images": job.image_count}


def _image(decoded: Decoded, seed: int) -> JobImage:
    return JobImage(decoded.png, seed, decoded.steps_computed, decoded.steps_cached)


def _error(error: BaseException) -> dict[str, Any]:
    """What the synchronous API would have answered, as the job's ``error``."""
    answer = translate(error)
    if isinstance(answer, ApiError):
        return error_body(answer.status or 422, answer.field, answer.message, answer.code)["error"]
    logger.error("job failed", exc_info=error)
    return internal_error_body()["error"]
