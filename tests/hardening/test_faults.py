"""A Denoiser replica killed under load, with two Denoiser replicas: every request either
succeeds or gets 503 with Retry-After and the JSON error body naming its request id, none hangs,
and a request sent after the kill succeeds within 15 s. The VAEDecoder's one replica killed under
load costs no request at all: its calls are made once more, on the replica Serve starts anew.

An app of its own (``/killed``), so that nothing broken here reaches the other modules. The kill
is ``ray.kill`` on the replica's actor (as SIGKILL would: no shutdown, its calls lost).

Figures: ``pytest tests/hardening/test_faults.py -s`` prints the recovery time (from the kill to
the first success of a request sent after it) and what the clients got.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
import ray
from ray import serve

from tests.hardening.test_backpressure import assert_generic_5xx

APP = "killed"
PROMPT = "a red circle on a blue background"
CLIENT_TIMEOUT_S = 60.0  # a request taking longer counts as hung
RECOVERY_S = 15.0


@pytest.fixture(scope="module")
def url(deploy_app) -> str:
    yield deploy_app(APP, "/killed", deployments={"Denoiser": {"num_replicas": 2}})
    serve.delete(APP)


@dataclass
class Outcome:
    start: float
    seconds: float
    response: httpx.Response | None
    error: str | None = None


@dataclass
class Traffic:
    """``clients`` clients sending requests back to back until stopped; every outcome kept."""

    url: str
    clients: int
    body: dict = field(default_factory=lambda: {"prompt": PROMPT, "steps": 20})
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Traffic:
        self._pool = ThreadPoolExecutor(self.clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(self.clients)]
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=CLIENT_TIMEOUT_S + 30)
        self._pool.shutdown()

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT_S) as client:
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

    def first_success_after(self, moment: float) -> float | None:
        ends = [o.start + o.seconds for o in self.outcomes
                if o.start >= moment and o.response is not None and o.response.status_code == 200]
        return min(ends) - moment if ends else None


def replica_actors(deployment: str) -> list[str]:
    """The names of this app's replica actors of ``deployment`` (Serve: app#deployment#id)."""
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if f"::{APP}#{deployment}#" in actor["name"]]


def kill(actor: str) -> float:
    """As SIGKILL would: no shutdown, the calls it held lost. Returns when."""
    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
    return time.monotonic()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(0.2)


def test_a_denoiser_killed_under_load_costs_only_503s_and_service_resumes(url):
    wait_for(lambda: len(replica_actors("Denoiser")) == 2, 60, "two Denoiser replicas")
    with Traffic(url, clients=8) as traffic:
        wait_for(lambda: sum(o.response is not None for o in traffic.outcomes) >= 8, 120,
                 "requests served before the kill")
        time.sleep(1.0)  # both replicas mid-batch
        victim = replica_actors("Denoiser")[0]
        killed_at = kill(victim)
        wait_for(lambda: traffic.first_success_after(killed_at) is not None, RECOVERY_S,
                 "a request sent after the kill succeeding")
        time.sleep(3.0)  # and a few more requests while Serve replaces the replica
    recovery_s = traffic.first_success_after(killed_at)
    statuses = Counter(o.response.status_code if o.response else o.error for o in traffic.outcomes)
    print(f"\nkilled {victim}: first success {recovery_s:.2f} s after the kill; {dict(statuses)}")
    assert recovery_s is not None and recovery_s < RECOVERY_S
    assert set(statuses) <= {200, 503}, statuses  # no 500, no transport error, no hang
    assert statuses[503] >= 1, "the killed replica held no request: nothing was tested"
    for outcome in traffic.outcomes:
        assert outcome.seconds < CLIENT_TIMEOUT_S
        if outcome.response.status_code == 503:
            assert_generic_5xx(outcome.response)
            assert outcome.response.json()["error"]["code"] == "stage_unavailable"


def test_a_vae_decoder_killed_under_load_costs_no_request(url):
    (victim,) = replica_actors("VAEDecoder")
    # 2 steps at 256 px: decoding is a large share of each request, so decodes are in flight
    body = {"prompt": PROMPT, "steps": 2, "width": 256, "height": 256}
    with Traffic(url, clients=8, body=body) as traffic:
        wait_for(lambda: sum(o.response is not None for o in traffic.outcomes) >= 8, 120,
                 "requests served before the kill")
        killed_at = kill(victim)
        wait_for(lambda: traffic.first_success_after(killed_at) is not None, 90,
                 "a request sent after the kill succeeding (on a new VAEDecoder)")
    statuses = Counter(o.response.status_code if o.response else o.error for o in traffic.outcomes)
    print(f"\nkilled {victim}: first success {traffic.first_success_after(killed_at):.2f} s "
          f"after the kill; {dict(statuses)}")
    assert set(statuses) == {200}, statuses  # the decodes it lost were made again
