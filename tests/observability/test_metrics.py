"""Raydiance's metrics in a real scrape of Ray's metrics port: present, tagged, and counting right.

Counts are compared as differences over one burst of traffic: series outlive replicas and
redeploys, so absolute values say nothing.
"""
from __future__ import annotations

from tests.clients import leave_mid_denoise
from tests.observability.conftest import APP_NAME, GENERATE, PROMPT_A
from tests.observability.prom import Scrape, documented_metrics, poll, specs_by_scraped_name

SERVE_TAGS = {"application", "deployment", "replica"}


def test_every_documented_metric_is_scraped_with_its_tags(traffic):
    missing, untagged = [], {}
    for name, (kind, tags) in documented_metrics().items():
        spec = specs_by_scraped_name()[name]
        if not traffic.after.present(spec):
            missing.append(name)
            continue
        absent = (set(tags) | SERVE_TAGS) - traffic.after.label_keys(spec)
        if absent:
            untagged[name] = sorted(absent)
    assert not missing, f"documented but not in Ray's scrape: {missing}"
    assert not untagged, f"scraped without these tags: {untagged}"


def test_requests_counted_once_each_by_endpoint_and_status(traffic):
    ok, bad = len(traffic.ok), len(traffic.bad)
    assert traffic.rise("ray_raydiance_requests_total", endpoint=GENERATE, status="200") == ok
    assert traffic.rise("ray_raydiance_requests_total", endpoint=GENERATE, status="422") == bad
    assert traffic.rise("ray_raydiance_request_latency_seconds_count", endpoint=GENERATE,
                        method="POST", status="200") == ok
    # Bucket counts are exact (only _sum is approximated by Ray): every request took >= 0 s and
    # below the last bucket, so the +Inf and 600 s buckets rose by the same amount.
    assert traffic.rise("ray_raydiance_request_latency_seconds_bucket", endpoint=GENERATE,
                        status="200", le="+Inf") == ok


def test_images_and_stage_latencies_counted_per_image(traffic):
    ok = len(traffic.ok)
    assert traffic.rise("ray_raydiance_images_total", model="tiny-shapes") == ok
    for stage in ("encode", "decode"):
        assert traffic.rise("ray_raydiance_stage_latency_seconds_count", stage=stage) == ok, stage


def test_embedding_cache_hits_and_misses(traffic):
    # Requests 2 and 4 reuse request 1's prompt; request 3 has its own; the refused one never
    # reaches the encoder.
    assert traffic.rise("ray_raydiance_embedding_cache_lookups_total", result="hit") == 2
    assert traffic.rise("ray_raydiance_embedding_cache_lookups_total", result="miss") == 2
    assert traffic.after.total("ray_raydiance_embedding_cache_entries") >= 2


def test_a_cache_hit_draws_the_same_image(traffic):
    first, repeat = traffic.ok[0], traffic.ok[3]
    assert first.headers["x-raydiance-seed"] == repeat.headers["x-raydiance-seed"] == "1"
    assert first.content == repeat.content


def test_denoise_steps_computed_plus_cached_equal_steps_requested(traffic):
    """Needs the Denoiser's engine wired to ``EngineMetrics`` (deployments/denoiser.py)."""
    computed = traffic.rise("ray_raydiance_denoise_steps_total", result="computed")
    cached = traffic.rise("ray_raydiance_denoise_steps_total", result="cached")
    assert computed + cached == traffic.steps_requested, (computed, cached)
    if all("x-raydiance-steps-computed" in r.headers for r in traffic.ok):  # the API's own count
        assert computed == sum(int(r.headers["x-raydiance-steps-computed"]) for r in traffic.ok)
        assert cached == sum(int(r.headers["x-raydiance-steps-cached"]) for r in traffic.ok)
    ok = len(traffic.ok)
    assert traffic.rise("ray_raydiance_denoise_requests_total", result="finished") == ok
    assert traffic.rise("ray_raydiance_denoise_queue_seconds_count") == ok
    assert traffic.rise("ray_raydiance_stage_latency_seconds_count", stage="denoise") == ok


def test_unet_forwards_and_rows(traffic):
    """Needs the engine wired too. Each engine step is one forward for the requests in it; every
    request here is guided (2 rows), every row runs the first block, and only the rows of steps
    First Block Cache did not skip run the rest of the UNet."""
    longest = max(int(r.headers["x-raydiance-steps"]) for r in traffic.ok)
    forwards = traffic.rise("ray_raydiance_unet_forward_rows_count")
    assert longest <= forwards <= traffic.steps_requested, forwards
    assert traffic.rise("ray_raydiance_unet_forward_seconds_count") == forwards
    computed = traffic.rise("ray_raydiance_denoise_steps_total", result="computed")
    assert traffic.rise("ray_raydiance_unet_rows_total", part="head") == 2 * traffic.steps_requested
    assert traffic.rise("ray_raydiance_unet_rows_total", part="tail") == 2 * computed


def test_jobs_counted_by_status(traffic):
    """The job run before the burst: finished, its queueing timed, the registry's gauges set."""
    after = traffic.after
    assert after.total("ray_raydiance_jobs_finished_total", status="succeeded") >= 1
    assert after.total("ray_raydiance_job_queue_seconds_count") >= 1
    assert after.total("ray_raydiance_jobs", status="succeeded") >= 1
    assert after.total("ray_raydiance_jobs", status="queued") == 0
    assert after.total("ray_raydiance_job_image_bytes") > 0


def test_model_loads_counted_at_replica_start(app):
    """Each of the three model-holding stages loaded the model once, successfully."""
    def loads_exported() -> Scrape | None:
        now = app.scrape()
        return now if now.total("ray_raydiance_model_loads_total") >= 3 else None

    scraped = poll(loads_exported, 30, "model loads exported")
    assert scraped.total("ray_raydiance_model_loads_total", kind="model", result="ok") >= 3
    assert scraped.total("ray_raydiance_model_loads_total", result="error") == 0
    assert scraped.total("ray_raydiance_model_load_seconds_count", kind="model") >= 3


def test_a_client_that_leaves_is_counted_499_and_its_denoise_cancelled(app):
    """The client gives up mid-generation: the Ingress records 499, and (with the engine wired)
    the Denoiser drops the request: one more cancelled, no more finished."""
    from ray import serve

    denoiser = serve.get_deployment_handle("Denoiser", APP_NAME)
    before = app.scrape()
    leave_mid_denoise(f"{app.url}{GENERATE}", {"prompt": PROMPT_A, "seed": 9, "steps": 100},
                      lambda: denoiser.stats.remote().result(timeout_s=30)["active"])

    def rise(now: Scrape, name: str, **labels: str) -> float:
        return now.total(name, **labels) - before.total(name, **labels)

    def counted() -> Scrape:
        now = app.scrape()
        gone = rise(now, "ray_raydiance_requests_total", endpoint=GENERATE, status="499")
        dropped = rise(now, "ray_raydiance_denoise_requests_total", result="cancelled")
        assert gone >= 1 and dropped >= 1, f"499s {gone}, cancelled {dropped}"  # poll reports it
        return now

    # Two replicas' counters, each exported on Ray's own schedule: a busy machine takes a while.
    now = poll(counted, 60, "499 and cancelled counted", interval_s=1.0)
    assert rise(now, "ray_raydiance_requests_total", endpoint=GENERATE, status="499") == 1
    assert rise(now, "ray_raydiance_denoise_requests_total", result="cancelled") == 1
    assert rise(now, "ray_raydiance_denoise_requests_total", result="finished") == 0
