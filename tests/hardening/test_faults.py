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

import time
from collections import Counter

import pytest
import ray
from ray import serve

from tools.traffic import Traffic, wait_for

from tests.hardening.test_backpressure import assert_generic_5xx

APP = "killed"
PROMPT = "a red circle on a blue background"
CLIENT_TIMEOUT_S = 60.0  # a request taking longer counts as hung
RECOVERY_S = 15.0
BODY = {"prompt": PROMPT, "steps": 20}


@pytest.fixture(scope="module")
def url(deploy_app) -> str:
    yield deploy_app(APP, "/killed", deployments={"Denoiser": {"num_replicas": 2}})
    serve.delete(APP)


def replica_actors(deployment: str) -> list[str]:
    """The names of this app's replica actors of ``deployment`` (Serve: app#deployment#id)."""
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if f"::{APP}#{deployment}#" in actor["name"]]


def kill(actor: str) -> float:
    """As SIGKILL would: no shutdown, the calls it held lost. Returns when."""
    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
    return time.monotonic()


def test_a_denoiser_killed_under_load_costs_only_503s_and_service_resumes(url):
    wait_for(lambda: len(replica_actors("Denoiser")) == 2, 60, "two Denoiser replicas")
    with Traffic(url, clients=8, body=BODY, timeout_s=CLIENT_TIMEOUT_S) as traffic:
        wait_for(lambda: traffic.answered() >= 8, 120,
                 "requests served before the kill")
        time.sleep(1.0)  # both replicas mid-batch
        victim = replica_actors("Denoiser")[0]
        killed_at = kill(victim)
        wait_for(lambda: traffic.first_success_after(killed_at) is not None, RECOVERY_S,
                 "a request sent after the kill succeeding")
        time.sleep(3.0)  # and a few more requests while Serve replaces the replica
    recovery_s = traffic.first_success_after(killed_at)
    statuses = Counter(o.status for o in traffic.outcomes)
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
    with Traffic(url, clients=8, body=body, timeout_s=CLIENT_TIMEOUT_S) as traffic:
        wait_for(lambda: traffic.answered() >= 8, 120,
                 "requests served before the kill")
        killed_at = kill(victim)
        wait_for(lambda: traffic.first_success_after(killed_at) is not None, 90,
                 "a request sent after the kill succeeding (on a new VAEDecoder)")
    statuses = Counter(o.status for o in traffic.outcomes)
    print(f"\nkilled {victim}: first success {traffic.first_success_after(killed_at):.2f} s "
          f"after the kill; {dict(statuses)}")
    assert set(statuses) == {200}, statuses  # the decodes it lost were made again
