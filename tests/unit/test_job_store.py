"""The job registry's bookkeeping: admission order, positions, cancel, TTL, caps, byte budget."""
from __future__ import annotations

import pytest

from deployments.job_store import JobImage, JobStore, QueueFull


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, **caps) -> JobStore:
    settings = {"ttl_s": 60.0, "max_queued": 3, "max_jobs": 10, "image_bytes": 100, **caps}
    return JobStore(clock=clock, **settings)


def _png(size: int, seed: int = 0) -> list[JobImage]:
    return [JobImage(b"x" * size, seed, 3, 1)]


def test_jobs_start_first_in_first_out_and_positions_count_those_ahead():
    store = _store(Clock())
    jobs = [store.submit(steps=4, image_count=1) for _ in range(3)]
    assert [store.position(job) for job in jobs] == [0, 1, 2]
    assert store.next_queued() is jobs[0] and jobs[0].status == "running"
    assert store.position(jobs[0]) is None and [store.position(j) for j in jobs[1:]] == [0, 1]
    assert store.cancel(jobs[1]) and jobs[1].status == "cancelled"
    assert store.position(jobs[2]) == 0 and store.next_queued() is jobs[2]
    assert store.next_queued() is None
    assert not store.cancel(jobs[1])  # idempotent: a finished job stays as it is


def test_the_queue_cap_refuses_more_but_running_jobs_do_not_count():
    store = _store(Clock())
    for _ in range(3):
        store.submit(steps=4, image_count=1)
    with pytest.raises(QueueFull):
        store.submit(steps=4, image_count=1)
    store.next_queued()
    store.submit(steps=4, image_count=1)  # one left the queue: room for one


def test_a_view_shows_progress_images_and_errors():
    store = _store(Clock())
    job = store.submit(steps=10, image_count=1)
    assert job.view(store.position(job))["position"] == 0
    store.next_queued()
    store.step(job, 0, 4, 10, None)
    assert job.view(None)["progress"] == {"step": 4, "steps": 10, "image": 0, "images": 1}
    store.succeed(job, _png(10, seed=7))
    view = job.view(None)
    assert view["status"] == "succeeded" and view["images"] == [
        {"seed": 7, "steps_computed": 3, "steps_cached": 1}]
    failed = store.submit(steps=10, image_count=1)
    store.next_queued()
    store.fail(failed, {"message": "steps: too many", "param": "steps"})
    assert failed.view(None)["error"]["param"] == "steps" and "images" not in failed.view(None)


def test_finished_jobs_expire_after_the_ttl_and_running_ones_never_do():
    clock = Clock()
    store = _store(clock)
    done, running = store.submit(4, 1), store.submit(4, 1)
    store.next_queued()
    store.succeed(done, _png(10))
    store.next_queued()
    clock.now += 61
    assert store.get(done.id) is None and store.stored_bytes == 0
    assert store.get(running.id) is running


def test_the_byte_budget_evicts_the_oldest_finished_jobs():
    store = _store(Clock(), image_bytes=100)
    jobs = []
    for _ in range(4):
        job = store.submit(4, 1)
        store.next_queued()
        store.succeed(job, _png(40))
        jobs.append(job)
    assert [store.get(job.id) is not None for job in jobs] == [False, False, True, True]
    assert store.stored_bytes == 80


def test_the_record_cap_evicts_finished_jobs_never_waiting_ones():
    store = _store(Clock(), max_jobs=3, max_queued=5)
    finished = store.submit(4, 1)
    store.next_queued()
    store.cancel(finished)
    waiting = [store.submit(4, 1) for _ in range(3)]
    assert store.get(finished.id) is None  # the fourth record pushed the finished one out
    waiting.append(store.submit(4, 1))  # only waiting ones left: kept, the queue cap bounds them
    assert all(store.get(job.id) is job for job in waiting)


def test_kept_images_are_a_finished_job_outside_the_queue():
    store = _store(Clock(), max_queued=1)
    store.submit(4, 1)
    kept = store.keep(_png(10) + _png(10, seed=1))
    assert kept.status == "succeeded" and len(kept.images) == 2 and store.position(kept) is None
    assert store.listing("succeeded", 10) == [kept] and store.counts()["queued"] == 1
