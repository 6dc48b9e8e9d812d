"""The jobs and their images, bounded: a FIFO of queued jobs, a TTL, caps and a byte budget.

Plain Python (no Ray, no tensors): the ``JobQueue`` deployment owns one and runs the jobs; this
decides what is kept and in which order jobs start. A queued job's position is the number of jobs
ahead of it in that order, which is the order they are admitted to the Denoisers.
"""
from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class JobImage:
    png: bytes
    seed: int
    steps_computed: int
    steps_cached: int

    def summary(self) -> dict[str, int]:
        return {"seed": self.seed, "steps_computed": self.steps_computed,
                "steps_cached": self.steps_cached}


@dataclass
class Job:
    id: str
    steps: int  # per image, as the request asked
    image_count: int
    created: float  # wall-clock seconds (epoch)
    status: JobStatus = "queued"
    started: float | None = None
    finished: float | None = None
    step: int = 0  # progress of the image being made
    step_total: int = 0  # the Denoiser's count for it (UNet evaluations: differs for Heun, img2img)
    image: int = 0  # images finished
    preview: np.ndarray | None = None  # the latest step's look, latent-sized RGB
    images: list[JobImage] = field(default_factory=list)
    error: dict[str, Any] | None = None  # the error body the synchronous API would have answered
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def image_bytes(self) -> int:
        return sum(len(image.png) for image in self.images)

    def view(self, position: int | None) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it, less the image URLs (the Ingress knows its
        own address)."""
        view: dict[str, Any] = {
            "id": self.id, "status": self.status, "created": self.created,
            "started": self.started, "finished": self.finished,
            "progress": {"step": self.step, "steps": self.step_total or self.steps,
                         "image": self.image, "images": self.image_count},
        }
        if position is not None:
            view["position"] = position
        if self.status == "succeeded":
            view["images"] = [image.summary() for image in self.images]
        if self.error is not None:
            view["error"] = self.error
        return view


class QueueFull(Exception):
    """More jobs are queued than ``max_queued``: the caller is told to retry later."""


class JobStore:
    """Every job known, oldest first; the queued ones in admission order."""

    def __init__(self, ttl_s: float, max_queued: int, max_jobs: int, image_bytes: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s, self.max_queued, self.max_jobs = ttl_s, max_queued, max_jobs
        self.image_budget = image_bytes
        self.clock = clock
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[str] = deque()
        self.stored_bytes = 0

    def submit(self, steps: int, image_count: int) -> Job:
        self.expire()
        if len(self.queue) >= self.max_queued:
            raise QueueFull(f"{len(self.queue)} jobs are queued, the most this server keeps")
        job = Job(secrets.token_urlsafe(12), steps, image_count, self.clock())
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self._evict(self.max_jobs)
        return job

    def keep(self, images: list[JobImage]) -> Job:
        """Images made without a job (a synchronous request that wants URLs), kept as a job
        that succeeded at once: never queued, so the queue cap does not apply."""
        self.expire()
        job = Job(secrets.token_urlsafe(12), 0, len(images), self.clock())
        job.started = job.created
        self.jobs[job.id] = job
        self.succeed(job, images)
        return job

    def get(self, job_id: str) -> Job | None:
        self.expire()
        return self.jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of ``job`` in admission order, while it is queued."""
        return self.queue.index(job.id) if job.status == "queued" else None

    def positions(self) -> dict[str, int]:
        return {job_id: index for index, job_id in enumerate(self.queue)}

    def next_queued(self) -> Job | None:
        """The job to start now: the head of the queue, marked running."""
        if not self.queue:
            return None
        job = self.jobs[self.queue.popleft()]
        job.status, job.started = "running", self.clock()
        return job

    def step(self, job: Job, image: int, step: int, steps: int, preview: np.ndarray | None) -> None:
        job.image, job.step, job.step_total = image, step, steps
        if preview is not None:
            job.preview = preview

    def succeed(self, job: Job, images: list[JobImage]) -> None:
        job.images = images
        job.image = len(images)
        self.stored_bytes += job.image_bytes
        self._finish(job, "succeeded")
        self._evict(self.max_jobs)

    def fail(self, job: Job, error: dict[str, Any]) -> None:
        job.error = error
        self._finish(job, "failed")

    def cancel(self, job: Job) -> bool:
        """Cancels a job not finished yet; False if it had finished (cancel is idempotent)."""
        if job.done:
            return False
        if job.status == "queued":
            self.queue.remove(job.id)
        self._finish(job, "cancelled")
        return True

    def listing(self, status: JobStatus | None, limit: int) -> list[Job]:
        """The newest jobs first, of ``status`` if given."""
        self.expire()
        jobs = [job for job in reversed(self.jobs.values()) if status in (None, job.status)]
        return jobs[:limit]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for job in self.jobs.values():
            counts[job.status] += 1
        return counts

    def expire(self) -> list[Job]:
        """Drops finished jobs (and their images) older than the TTL."""
        now = self.clock()
        old = [job for job in self.jobs.values()
               if job.finished is not None and now - job.finished > self.ttl_s]
        for job in old:
            self._drop(job)
        return old

    def _finish(self, job: Job, status: JobStatus) -> None:
        job.status, job.finished = status, self.clock()

    def _evict(self, max_jobs: int) -> None:
        """Oldest finished jobs first, until the images fit the byte budget and the records
        ``max_jobs`` (queued and running jobs are never evicted: the queue cap bounds them)."""
        finished = (job for job in list(self.jobs.values()) if job.done)
        while self.stored_bytes > self.image_budget or len(self.jobs) > max_jobs:
            job = next(finished, None)
            if job is None:
                return
            self._drop(job)

    def _drop(self, job: Job) -> None:
        del self.jobs[job.id]
        self.stored_bytes -= job.image_bytes
