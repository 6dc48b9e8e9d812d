"""The jobs API against the real app: queue order, events, cancel by id, any Ingress replica."""
from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
from PIL import Image

from tests.integration.conftest import png_pixels
from tests.integration.test_engine_http import denoiser_stats
from tests.integration.test_progress import read_events
from tools.tiny_shapes.world import classify

COLOURS = ["red", "green", "blue", "yellow", "white", "purple", "orange", "black"]
SHAPES = ["circle", "square", "triangle"]
# (shape colour, background colour, seed): twelve scenes the built-in model draws right at 10 steps
SCENES = [(COLOURS[i % 8], COLOURS[(i + 3) % 8], SHAPES[i % 3], 100 + i) for i in range(12)]


def _body(shape_colour: str, background: str, shape: str, seed: int, **extra) -> dict:
    return {"prompt": f"a {shape_colour} {shape} on a {background} background", "seed": seed,
            "steps": 10, **extra}


def wait_finished(client: httpx.Client, job_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] not in ("queued", "running"):
            return view
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {view['status']} after {timeout_s} s")


def test_twelve_jobs_at_once_finish_in_order_with_their_colours(apps):
    client = apps.jobs.client
    submitted = []
    for scene in SCENES:
        response = client.post("/v1/jobs", json=_body(*scene))
        assert response.status_code == 202, response.text
        view = response.json()
        assert response.headers["location"] == f"{apps.jobs.url}/v1/jobs/{view['id']}"
        assert view["status"] in ("queued", "running") and view["created"] > 0
        submitted.append(view)
    ids = [view["id"] for view in submitted]
    positions: dict[str, list[int]] = {job_id: [] for job_id in ids}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        views = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
        for view in views:
            if view["status"] == "queued":
                positions[view["id"]].append(view["position"])
        if all(view["status"] == "succeeded" for view in views):
            break
        assert not any(view["status"] in ("failed", "cancelled") for view in views), views
        time.sleep(0.05)
    queued = {job_id: seen for job_id, seen in positions.items() if seen}
    assert len(queued) >= 4, positions  # max_running 4: the rest waited their turn
    for seen in queued.values():
        assert seen == sorted(seen, reverse=True), seen  # a position only decreases
    later = [view["position"] for view in submitted if view["status"] == "queued"]
    assert later == sorted(later) and len(set(later)) == len(later)  # first come, first served
    for view, scene in zip(views, SCENES):
        (image,) = view["images"]
        assert image["seed"] == scene[3] and image["steps_computed"] + image["steps_cached"] == 10
        png = httpx.get(image["url"], timeout=30)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert classify(Image.open(io.BytesIO(png.content))) == scene[:2], scene
        assert view["progress"]["step"] == 10 and view["started"] >= view["created"]
        assert view["finished"] >= view["started"]


def test_events_show_every_step_then_the_image_generate_makes(apps):
    client = apps.jobs.client
    body = _body("red", "blue", "circle", 7, steps=8)
    job = client.post("/v1/jobs", json=body).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"previews": "true"}) as response:
        assert response.status_code == 200
        events = read_events(response)
    names = [name for name, _ in events]
    assert names[-1] == "succeeded" and "failed" not in names
    steps = [data for name, data in events if name == "step"]
    assert [s["step"] for s in steps] == list(range(1, 9)) and {s["steps"] for s in steps} == {8}
    previews = [png_pixels(base64.b64decode(s["preview"])) for s in steps]
    assert previews[0].shape == (16, 16, 3) and not np.array_equal(previews[0], previews[-1])
    (image,) = events[-1][1]["images"]
    from_job = png_pixels(httpx.get(image["url"], timeout=30).content)
    plain = client.post("/v1/generate", json=body)
    assert plain.status_code == 200
    assert np.array_equal(from_job, png_pixels(plain.content))  # the same seed, the same image
    preview = client.get(f"/v1/jobs/{job['id']}/preview")
    assert preview.status_code == 200 and png_pixels(preview.content).shape == (16, 16, 3)


def test_a_bad_job_is_refused_at_submit_naming_the_field(apps):
    client = apps.jobs.client
    for body, field in (({"prompt": "a red circle", "steps": 0}, "steps"),
                        ({"prompt": "a red circle", "model": "nope"}, "model"),
                        ({"prompt": "a red circle", "colour": 1}, "colour")):
        response = client.post("/v1/jobs", json=body)
        assert response.status_code in (404, 422), response.text
        assert response.json()["error"]["param"] == field
    missing = client.get("/v1/jobs/no-such-job")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs/bad..id").status_code == 422
    assert client.get("/v1/jobs/no-such-job/preview").status_code == 404
    assert client.delete("/v1/jobs/no-such-job").status_code == 404


def test_cancelling_by_id_stops_a_running_job_and_a_queued_one_never_starts(apps):
    client = apps.jobs.client
    slow = _body("green", "black", "square", 3, steps=100, width=256, height=256,
                 cache={"threshold": 0})
    running = client.post("/v1/jobs", json=slow).json()
    fillers = [client.post("/v1/jobs", json=slow).json() for _ in range(4)]  # max_running 4
    queued = client.post("/v1/jobs", json=slow).json()
    assert queued["status"] == "queued"
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{running['id']}").json()["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for job in (running, queued, *fillers):
        answer = client.delete(f"/v1/jobs/{job['id']}")
        assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    again = client.delete(f"/v1/jobs/{running['id']}")  # idempotent
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    deadline = time.monotonic() + 30  # the engine drops them at their next step
    while (stats := denoiser_stats("jobs"))["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["active"] == 0, stats
    time.sleep(1.5)
    assert denoiser_stats("jobs")["forwards"] == stats["forwards"]  # nothing of theirs runs
    assert client.get(f"/v1/jobs/{queued['id']}").json()["started"] is None
    cancelled = client.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()["jobs"]
    assert {running["id"], queued["id"]} <= {job["id"] for job in cancelled}
    after = client.post("/v1/jobs", json=_body("white", "purple", "circle", 5)).json()
    assert wait_finished(client, after["id"])["status"] == "succeeded"  # the queue moved on


def test_any_ingress_replica_answers_for_any_job(apps):
    client = apps.jobs.client
    response = client.post("/v1/jobs", json=_body("yellow", "blue", "triangle", 9, steps=100,
                                                  width=192, height=192))
    job_id, submitter = response.json()["id"], response.headers["x-raydiance-replica"]
    readers = set()
    for _ in range(200):  # the proxy picks a replica per request
        answer = client.get(f"/v1/jobs/{job_id}")
        assert answer.status_code == 200 and answer.json()["id"] == job_id
        readers.add(answer.headers["x-raydiance-replica"])
        if len(readers) == 2:
            break
    assert len(readers) == 2, readers
    for _ in range(200):
        answer = client.delete(f"/v1/jobs/{job_id}")
        if answer.headers["x-raydiance-replica"] != submitter:
            break
    assert answer.headers["x-raydiance-replica"] != submitter
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"


def test_openai_urls_fetch_the_png(apps):
    client = openai.OpenAI(base_url=f"{apps.jobs.url}/v1", api_key="unused", timeout=120)
    result = client.images.generate(prompt="a blue square on a yellow background", n=2,
                                    size="64x64", response_format="url",
                                    extra_body={"steps": 6, "seed": 11})
    assert len(result.data) == 2
    for item in result.data:
        assert item.url.startswith(f"{apps.jobs.url}/v1/jobs/") and item.b64_json is None
        png = httpx.get(item.url, timeout=30)
        assert png.status_code == 200 and png_pixels(png.content).shape == (64, 64, 3)


def test_the_caps_hold(apps):
    client = apps.capped.client  # max_running 1, max_queued 2
    slow = _body("green", "black", "square", 3, steps=100, width=256, height=256,
                 cache={"threshold": 0})
    jobs = [client.post("/v1/jobs", json=slow) for _ in range(3)]
    assert [j.status_code for j in jobs] == [202, 202, 202]
    full = client.post("/v1/jobs", json=slow)
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert full.json()["error"]["code"] == "queue_full"
    for job in jobs:
        client.delete(f"/v1/jobs/{job.json()['id']}")
    assert client.post("/v1/jobs", json=_body("red", "blue", "circle", 1, steps=2)).status_code == 202


def test_images_expire_and_the_byte_budget_evicts_the_oldest(apps):
    client = apps.capped.client  # image_bytes 20000: a 64 px PNG is ~5-7 kB
    finished = []
    for seed in range(5):
        job = client.post("/v1/jobs", json=_body("red", "blue", "circle", seed, steps=2)).json()
        finished.append(wait_finished(client, job["id"]))
        assert finished[-1]["status"] == "succeeded", finished[-1]
    sizes = [len(httpx.get(view["images"][0]["url"]).content) if client.get(
        f"/v1/jobs/{view['id']}").status_code == 200 else None for view in finished]
    assert sizes[0] is None  # the oldest went first
    assert sizes[-1] is not None and sum(s for s in sizes if s) <= 20000
    deadline = time.monotonic() + 30  # ttl_s 6
    while client.get(f"/v1/jobs/{finished[-1]['id']}").status_code == 200:
        assert time.monotonic() < deadline, "a finished job outlived its TTL"
        time.sleep(0.5)
    assert httpx.get(finished[-1]["images"][0]["url"]).status_code == 404


def test_when_the_registry_dies_its_jobs_are_gone_and_new_ones_work(apps):
    import ray
    from ray import serve

    client = apps.capped.client
    before = client.post("/v1/jobs", json=_body("red", "blue", "circle", 1, steps=2)).json()
    wait_finished(client, before["id"])
    slow = client.post("/v1/jobs", json=_body("green", "black", "square", 3, steps=40, width=256,
                                              height=256, cache={"threshold": 0})).json()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{slow['id']}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status = serve.status().applications["capped"].deployments["JobQueue"]
    assert status.status == "HEALTHY"
    from ray.serve._private.constants import SERVE_NAMESPACE

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "JobQueue" in a["name"] and "capped" in a["name"]]
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace=SERVE_NAMESPACE), no_restart=True)
    answers = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = client.get(f"/v1/jobs/{before['id']}")
        answers.append(answer.status_code)
        if answer.status_code == 404:
            break
        assert answer.status_code == 503 and "retry-after" in answer.headers, answer.text
        time.sleep(0.5)
    assert answers[-1] == 404  # the new registry never knew it
    assert answer.json()["error"]["code"] == "job_not_found"
    # The job it was running is not cancelled (Ray does not cancel a dead caller's calls): the
    # Denoiser finishes its remaining steps and the result goes nowhere; the leak is bounded.
    deadline = time.monotonic() + 120
    while (stats := denoiser_stats("capped"))["active"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stats["active"] == 0, stats
    after = client.post("/v1/jobs", json=_body("red", "blue", "circle", 2, steps=2))
    assert after.status_code == 202
    assert wait_finished(client, after.json()["id"])["status"] == "succeeded"

