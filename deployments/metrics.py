"""Raydiance's own metrics, exported by Ray on each node's metrics port as ``ray_raydiance_*``.

Why this shape:

- One table (``METRICS``) defines every metric; cluster/README.md documents each one and the
  tests check that the two agree and that each appears in a real scrape.
- Metrics are created on first use, not at import: ``ray.serve.metrics`` adds the
  ``deployment``, ``replica`` and ``application`` tags only when the metric is created inside a
  replica, and a module is imported before the replica's context exists.
- Recording never fails a request: a metric error is logged once and the request goes on.
- Ray exports a histogram's ``_sum`` as bucket midpoints times counts (an approximation), so
  wherever a mean matters there is an exact counter beside the histogram (``unet_rows``).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the engine's types, for hints only: importing them here costs nothing at run time
    from pipeline.engine import EngineResult
    from pipeline.engine.runner import StepReport

logger = logging.getLogger("ray.serve")

Kind = Literal["counter", "gauge", "histogram"]

# HTTP requests: 50 ms to 10 min (a 1024 px SDXL image on a busy card takes minutes).
REQUEST_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]
# Stages and queueing: a cached text encoding takes microseconds, a denoise minutes.
STAGE_BUCKETS_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120,
                   300, 600]
FORWARD_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]
ROW_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
LOAD_BUCKETS_S = [0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]


@dataclass(frozen=True)
class MetricSpec:
    """One metric as defined here; ``scraped`` is the name Prometheus sees."""

    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def scraped(self) -> str:
        """Ray prefixes ``ray_``; a counter gets ``_total``; a histogram's samples are
        ``<name>_bucket``/``_count``/``_sum`` under this family name."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


def _spec(name: str, kind: Kind, description: str, tags: tuple[str, ...] = (),
          buckets: list[float] | None = None) -> MetricSpec:
    return MetricSpec(name, kind, description, tags, tuple(buckets or ()))


METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    # Ingress: every HTTP request, whatever its outcome.
    _spec("raydiance_requests", "counter", "HTTP requests answered, by endpoint (the route "
          "template), method and status code (499: the client went away first).",
          ("endpoint", "method", "status")),
    _spec("raydiance_request_latency_seconds", "histogram", "HTTP request latency, from the "
          "request reaching the Ingress to the last byte of its answer.",
          ("endpoint", "method", "status"), REQUEST_BUCKETS_S),
    _spec("raydiance_auth_failures", "counter", "Requests refused for their API key (only when "
          "keys are configured), by reason: missing (no credentials), malformed (not Bearer or "
          "Basic user:password), wrong (no configured key).", ("reason",)),
    # Stages.
    _spec("raydiance_stage_latency_seconds", "histogram", "Time one request spent in a stage: "
          "encode (TextEncoder, batching wait included; a cache hit is near 0), denoise (the "
          "engine, first step to last), decode (VAEDecoder incl. PNG, batching wait included).",
          ("stage", "model"), STAGE_BUCKETS_S),
    _spec("raydiance_denoise_queue_seconds", "histogram", "Time a request waited in a Denoiser "
          "replica before the engine ran its first step.", ("model",), STAGE_BUCKETS_S),
    # The Denoiser engine.
    _spec("raydiance_denoise_steps", "counter", "Denoising steps of finished requests, by result: "
          "computed (a full UNet pass) or cached (skipped by First Block Cache).",
          ("model", "result")),
    _spec("raydiance_denoise_requests", "counter", "Requests that left the Denoiser engine, by "
          "result: finished or cancelled (their caller went away).", ("model", "result")),
    _spec("raydiance_unet_forward_rows", "histogram", "Batch rows per UNet forward (a request "
          "with guidance counts 2 rows); its _count is the number of forwards.", ("model",),
          ROW_BUCKETS),
    _spec("raydiance_unet_rows", "counter", "Batch rows through the UNet, exact, by part: head "
          "(every row runs the first block) or tail (rows whose step First Block Cache did not "
          "skip ran the rest). head / raydiance_unet_forward_rows_count = mean rows per forward.",
          ("model", "part")),
    _spec("raydiance_unet_forward_seconds", "histogram", "Wall time of one engine step: one "
          "batched UNet forward plus the scheduler steps of its requests.", ("model",),
          FORWARD_BUCKETS_S),
    _spec("raydiance_engine_active_requests", "gauge", "Requests inside a Denoiser replica's "
          "engine (running or waiting for a slot in the next forward)."),
    _spec("raydiance_images", "counter", "Images generated (decoded to PNG).", ("model",)),
    # The TextEncoder's embedding cache.
    _spec("raydiance_embedding_cache_lookups", "counter", "Text-embedding cache lookups by "
          "result: hit (conditioning reused) or miss (encoded).", ("model", "result")),
    _spec("raydiance_embedding_cache_entries", "gauge", "Conditionings held by a TextEncoder "
          "replica's cache."),
    # Model and LoRA loading (ModelStore).
    _spec("raydiance_model_loads", "counter", "Model and LoRA loads by kind (model or lora) and "
          "result (ok or error).", ("model", "kind", "result")),
    _spec("raydiance_model_load_seconds", "histogram", "Time to load a model or LoRA onto a "
          "replica's device.", ("model", "kind"), LOAD_BUCKETS_S),
    _spec("raydiance_replica_model_bytes", "gauge", "Tensor bytes a replica holds, by model and "
          "component (text_encoder, text_encoder_2, unet, vae; LoRA adapters count in the "
          "component that took them): each stage holds only its own part.", ("model", "component")),
    # Jobs (JobQueue).
    _spec("raydiance_jobs", "gauge", "Jobs the registry holds, by status (queued, running, "
          "succeeded, failed, cancelled).", ("status",)),
    _spec("raydiance_jobs_finished", "counter", "Jobs finished, by status (succeeded, failed, "
          "cancelled).", ("status",)),
    _spec("raydiance_job_queue_seconds", "histogram", "Time a job waited in the queue before "
          "it was admitted to the Denoisers.", (), STAGE_BUCKETS_S),
    _spec("raydiance_job_image_bytes", "gauge", "PNG bytes the job registry stores (bounded by "
          "jobs.image_bytes)."),
)}

_created: dict[str, Any] = {}
_lock = threading.Lock()
_failed: set[str] = set()


def _metric(name: str) -> Any:
    """The Ray metric object for ``name``, created on first use in this process."""
    metric = _created.get(name)
    if metric is not None:
        return metric
    from ray.serve import metrics as serve_metrics

    spec = METRICS[name]
    with _lock:
        if name not in _created:
            if spec.kind == "counter":
                metric = serve_metrics.Counter(spec.name, spec.description, spec.tags)
            elif spec.kind == "gauge":
                metric = serve_metrics.Gauge(spec.name, spec.description, spec.tags)
            else:
                metric = serve_metrics.Histogram(spec.name, spec.description, list(spec.buckets),
                                                 spec.tags)
            _created[name] = metric
        return _created[name]


def _record(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    try:
        metric = _metric(name)
        kind = METRICS[name].kind
        if kind == "counter":
            if value > 0:  # Ray refuses inc(0)
                metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception:  # noqa: BLE001 - a metric must never fail the request it describes
        if name not in _failed:
            _failed.add(name)
            logger.exception("raydiance: recording metric %s failed; further failures not logged", name)


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    _record(name, value, tags)


def observe(name: str, value: float, **tags: str) -> None:
    _record(name, max(value, 0.0), tags)


def set_gauge(name: str, value: float, **tags: str) -> None:
    _record(name, value, tags)


# --- what each stage records ---------------------------------------------------------------------

def record_request(endpoint: str, method: str, status: int, seconds: float) -> None:
    tags = {"endpoint": endpoint, "method": method, "status": str(status)}
    inc("raydiance_requests", **tags)
    observe("raydiance_request_latency_seconds", seconds, **tags)


def record_auth_failure(reason: str) -> None:
    inc("raydiance_auth_failures", reason=reason)


def record_stage(stage: str, model: str, seconds: float) -> None:
    observe("raydiance_stage_latency_seconds", seconds, stage=stage, model=model)


def record_load(model: str, kind: Literal["model", "lora"], seconds: float, ok: bool) -> None:
    """One model or LoRA load (the LoRA loader calls this with ``kind="lora"``)."""
    inc("raydiance_model_loads", model=model, kind=kind, result="ok" if ok else "error")
    if ok:
        observe("raydiance_model_load_seconds", seconds, model=model, kind=kind)


class LoadTimer:
    """``with LoadTimer(name, "model"): load(...)``: records the load, failed or not."""

    def __init__(self, model: str, kind: Literal["model", "lora"]) -> None:
        self.model, self.kind = model, kind

    def __enter__(self) -> "LoadTimer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        record_load(self.model, self.kind, time.perf_counter() - self.start, ok=exc_type is None)


class EngineMetrics:
    """The Denoiser engine's ``EngineObserver`` (``pipeline.engine.loop``), as Ray metrics.

    Holds no Ray state of its own (metrics are created on first use), so the Denoiser replica
    constructs it in ``__init__``: ``DenoiseEngine(..., observer=EngineMetrics())``.
    """

    def __init__(self) -> None:
        self._active: int | None = None

    def on_forward(self, model: str, step: StepReport, seconds: float) -> None:
        """One batched forward: rows through the head (all), rows through the tail (the steps
        First Block Cache did not skip), and the step's wall time."""
        observe("raydiance_unet_forward_rows", step.rows, model=model)
        inc("raydiance_unet_rows", step.rows, model=model, part="head")
        inc("raydiance_unet_rows", step.tail_rows, model=model, part="tail")
        observe("raydiance_unet_forward_seconds", seconds, model=model)

    def on_finished(self, model: str, result: EngineResult) -> None:
        """A finished request: its steps by result, its queue and denoise times."""
        inc("raydiance_denoise_steps", result.steps_computed, model=model, result="computed")
        inc("raydiance_denoise_steps", result.steps_cached, model=model, result="cached")
        inc("raydiance_denoise_requests", model=model, result="finished")
        observe("raydiance_denoise_queue_seconds", result.queued_s, model=model)
        record_stage("denoise", model, result.denoise_s)

    def on_cancelled(self, model: str) -> None:
        inc("raydiance_denoise_requests", model=model, result="cancelled")

    def on_active(self, count: int) -> None:
        if count != self._active:  # called every step: record changes only
            self._active = count
            set_gauge("raydiance_engine_active_requests", count)

