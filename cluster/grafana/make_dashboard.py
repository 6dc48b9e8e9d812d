"""Writes cluster/grafana/dashboards/raydiance.json, the Raydiance Grafana dashboard.

The dashboard is generated rather than hand-edited: every panel is bound to the ``$datasource``
variable the same way, ids and grid positions are computed, and the PromQL lives in one readable
place. tests/observability checks that the committed JSON is this script's output and that every
expression in it returns data from a real Prometheus scraping a real Raydiance.

    python cluster/grafana/make_dashboard.py          # rewrite the JSON
    python cluster/grafana/make_dashboard.py --check  # exit 1 if the JSON is stale
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "raydiance.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every raydiance_* and ray_serve_* series carries application and deployment (Serve adds them).
SEL = 'application=~"$application", deployment=~"$deployment"'
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


def target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref,
            "range": True, "instant": False}


def quantiles(metric: str, by: str, selector: str = SEL, window: str = RATE) -> list[dict[str, Any]]:
    """p50/p95/p99 of a histogram, one series per ``by`` group."""
    refs = "ABC"
    legend_by = " ".join("{{%s}}" % label.strip() for label in by.split(","))
    return [target(f"histogram_quantile({q}, sum by ({by}, le) "
                   f"(rate({metric}_bucket{{{selector}}}[{window}])))",
                   f"p{int(q * 100)} {legend_by}", refs[i]) for i, q in enumerate(QUANTILES)]


def share(counter: str, result: str) -> str:
    """The share of ``counter``'s increase that carries ``result`` (0 rather than no data when
    none does)."""
    return (f'(sum(rate({counter}{{{SEL}, result="{result}"}}[{RATE}])) or vector(0)) '
            f"/ sum(rate({counter}{{{SEL}}}[{RATE}]))")


def by_deployment(*series: tuple[str, str], first_ref: str = "A") -> list[dict[str, Any]]:
    """One ``sum by (deployment)`` target per (metric, legend word), refs from ``first_ref`` on."""
    start = ord(first_ref)
    return [target(f"sum by (deployment) ({metric}{{{SEL}}})", f"{word} {{{{deployment}}}}",
                   chr(start + i)) for i, (metric, word) in enumerate(series)]


def timeseries(title: str, targets: list[dict[str, Any]], unit: str = "short",
               description: str = "", stack: bool = False, width: int = 8) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": True}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries", "title": title, "description": description,
        "datasource": DATASOURCE, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "_width": width,
    }


# ray_serve_deployment_status: Serve's numeric deployment status.
DEPLOYMENT_STATUS = {0: ("UNKNOWN", "gray"), 1: ("DEPLOY_FAILED", "red"), 2: ("UNHEALTHY", "red"),
                     3: ("UPDATING", "blue"), 4: ("UPSCALING", "blue"), 5: ("DOWNSCALING", "blue"),
                     6: ("HEALTHY", "green")}


def deployment_health() -> dict[str, Any]:
    """A state timeline of each deployment's status, named as Serve names it."""
    mappings = [{"type": "value", "options": {str(value): {"text": text, "color": color}
                                              for value, (text, color) in DEPLOYMENT_STATUS.items()}}]
    return {
        "type": "state-timeline", "title": "Deployment health",
        "description": "Serve's status of each deployment (HEALTHY, UPDATING, UNHEALTHY, ...).",
        "datasource": DATASOURCE,
        "targets": [target(f"max by (deployment) (ray_serve_deployment_status{{{SEL}}})",
                           "{{deployment}}")],
        "fieldConfig": {"defaults": {"mappings": mappings, "color": {"mode": "thresholds"},
                                     "thresholds": {"mode": "absolute", "steps": [
                                         {"color": "green", "value": None}]}},
                        "overrides": []},
        "options": {"showValue": "auto", "mergeValues": True, "rowHeight": 0.9,
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False}},
        "_width": 6,
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "datasource": DATASOURCE,
            "panels": [], "_width": 24}


def raydiance(metric: str) -> str:
    return f"ray_raydiance_{metric}"


def per_forward(part: str) -> str:
    """Mean rows per forward from the exact row counter (Ray's histogram _sum is approximate)."""
    rows = f'rate({raydiance("unet_rows_total")}{{{SEL}, part="{part}"}}[{RATE}])'
    forwards = f"rate({raydiance('unet_forward_rows_count')}{{{SEL}}}[{RATE}])"
    return f"sum by (model) ({rows}) / sum by (model) ({forwards})"


def traffic_panels() -> list[dict[str, Any]]:
    """The requests the Ingress answers, and each stage's latency."""
    req = raydiance("requests_total")
    return [
        row("Traffic"),
        timeseries("Requests/s by endpoint", [target(
            f"sum by (endpoint) (rate({req}{{{SEL}}}[{RATE}]))", "{{endpoint}}")], "reqps",
            "Every HTTP answer of the Ingress, by route template.", width=6),
        timeseries("Errors/s by endpoint and status", [target(
            f'sum by (endpoint, status) (rate({req}{{{SEL}, status=~"4..|5.."}}[{RATE}]))',
            "{{endpoint}} {{status}}")], "reqps",
            "4xx: the caller's mistakes; 499: the client left first; 5xx: overload (503) or faults.",
            width=6),
        timeseries("API key failures/s by reason", [target(
            f"sum by (reason) (rate({raydiance('auth_failures_total')}{{{SEL}}}[{RATE}]))",
            "{{reason}}")], "reqps",
            "401s for the API key (only with auth configured): missing, malformed or wrong. "
            "A rise in wrong: a client with an old key, or someone guessing.", width=6),
        timeseries("Images/s", [target(
            f"sum by (model) (rate({raydiance('images_total')}{{{SEL}}}[{RATE}]))", "{{model}}")],
            "short", "Images decoded to PNG, per second.", width=6),
        timeseries("Request latency by endpoint (p50/p95/p99)",
                   quantiles(raydiance("request_latency_seconds"), "endpoint"), "s",
                   "From the request reaching the Ingress to the last byte of its answer.", width=12),
        timeseries("Stage latency (p50/p95/p99)",
                   quantiles(raydiance("stage_latency_seconds"), "stage"), "s",
                   "encode: TextEncoder (a cache hit is ~0); denoise: the engine, first step to "
                   "last; decode: VAEDecoder incl. PNG.", width=12),
    ]


def engine_panels() -> list[dict[str, Any]]:
    """The Denoiser's engine: queueing, First Block Cache, batch fill, step time."""
    steps = raydiance("denoise_steps_total")
    return [
        row("Denoiser engine"),
        timeseries("Time queued before the engine", quantiles(
            raydiance("denoise_queue_seconds"), "model"), "s",
            "From reaching a Denoiser replica to the engine running the request's first step."),
        timeseries("First Block Cache hit ratio", [target(share(steps, "cached"), "cached / all steps")],
                   "percentunit",
            "Share of denoising steps that First Block Cache skipped."),
        timeseries("Steps/s computed vs cached", [target(
            f"sum by (result) (rate({steps}{{{SEL}}}[{RATE}]))", "{{result}}")], "short",
            "Steps of finished requests: computed (full UNet) or cached (skipped).", stack=True),
        timeseries("Rows per UNet forward", [
            *quantiles(raydiance("unet_forward_rows"), "model")[:2],
            target(per_forward("head"), "mean {{model}}", "C"),
            target(per_forward("tail"), "mean through the whole UNet {{model}}", "D")],
            "short", "How full each batched UNet forward is (2 rows per request with guidance); "
            "rows whose step First Block Cache skipped run the first block only.", width=6),
        timeseries("UNet forwards/s", [target(
            f"sum by (model) (rate({raydiance('unet_forward_seconds_count')}{{{SEL}}}[{RATE}]))",
            "{{model}}")], "short", "Batched UNet forwards per second (engine steps).", width=6),
        timeseries("Engine step time (p50/p95/p99)", quantiles(
            raydiance("unet_forward_seconds"), "model"), "s",
            "Wall time of one engine step: the batched UNet forward and its scheduler steps.",
            width=6),
        timeseries("Requests in each engine", [target(
            f"sum by (deployment, replica) ({raydiance('engine_active_requests')}{{{SEL}}})",
            "{{deployment}} {{replica}}")], "short",
            "Requests inside each Denoiser replica's engine (running or waiting for the next "
            "forward).", width=6),
    ]


def serve_panels() -> list[dict[str, Any]]:
    """Serve's replicas and queues, and the TextEncoder's embedding cache."""
    return [
        row("Serve: replicas and queues"),
        timeseries("Active and queued requests per deployment", by_deployment(
            ("ray_serve_replica_processing_queries", "active"),
            ("ray_serve_deployment_queued_queries", "queued")), "short",
            "Active: being processed by replicas; queued: waiting in callers' handles for a "
            "replica.", width=6),
        timeseries("Replicas per deployment", by_deployment(
            ("ray_serve_deployment_replica_healthy", "healthy"),
            ("ray_serve_autoscaling_target_replicas", "target")), "short",
            "Replicas passing Serve's health checks, and the autoscaler's target: a gap between "
            "the two is replicas starting, failing or being replaced.", width=6),
        deployment_health(),
        timeseries("Text embedding cache", [
            target(share(raydiance("embedding_cache_lookups_total"), "hit"), "hit ratio", "A"),
            *by_deployment((raydiance("embedding_cache_entries"), "entries"), first_ref="B")],
            "short",
            "Share of prompt encodings served from the TextEncoder's LRU, and its size.",
            width=6),
    ]


def model_panels() -> list[dict[str, Any]]:
    """What each stage holds, and model and LoRA loads."""
    return [
        row("Models: what each stage holds, and loads"),
        timeseries("Model memory by deployment and component", [target(
            f"sum by (deployment, component) ({raydiance('replica_model_bytes')}{{{SEL}}})",
            "{{deployment}} {{component}}")], "bytes",
            "Tensor bytes held, summed over each deployment's replicas: the TextEncoder holds "
            "text encoders, the Denoiser UNets, the VAEDecoder VAEs, and nothing else.", stack=True),
        timeseries("Loads (since start)", [target(
            f"sum by (model, kind, result) ({raydiance('model_loads_total')}{{{SEL}}})",
            "{{kind}} {{model}} {{result}}")], "short",
            "Model and LoRA loads onto replicas, cumulative."),
        timeseries("Load time over the dashboard range (p50/p95/p99)", quantiles(
            raydiance("model_load_seconds"), "kind, model", window="$__range"), "s",
            "How long loading a model or LoRA onto a replica's device took."),
    ]


def job_panels() -> list[dict[str, Any]]:
    """The jobs API's registry: what it holds, how fast jobs finish, how long they wait."""
    return [
        row("Jobs (/v1/jobs)"),
        timeseries("Jobs by status", [target(
            f"sum by (status) ({raydiance('jobs')}{{{SEL}}})", "{{status}}")], "short",
            "Jobs the registry holds: queued (the queue's depth), running (admitted to the "
            "Denoisers), and finished ones until they expire or are evicted.", width=6),
        timeseries("Jobs finished/s by status", [target(
            f"sum by (status) (rate({raydiance('jobs_finished_total')}{{{SEL}}}[{RATE}]))",
            "{{status}}")], "short", "succeeded, failed or cancelled, per second.", width=6),
        timeseries("Time queued (p50/p95/p99)",
                   quantiles(raydiance("job_queue_seconds"), "application"), "s",
                   "From submit to admission to the Denoisers: grows when jobs.max_running are "
                   "busy and more wait.", width=6),
        timeseries("Stored job images", [target(
            f"sum by (application) ({raydiance('job_image_bytes')}{{{SEL}}})",
            "{{application}}")], "bytes",
            "PNG bytes the registry keeps for image URLs, bounded by jobs.image_bytes.", width=6),
    ]


def node_panels() -> list[dict[str, Any]]:
    """Ray's node metrics: CPU, memory, GPUs."""
    return [
        row("Nodes (Ray)"),
        timeseries("Node CPU", [target("avg by (ip) (ray_node_cpu_utilization)", "{{ip}}")],
                   "percent", "CPU utilisation per node, from Ray's node metrics.", width=6),
        timeseries("Node memory", [
            target("sum by (ip) (ray_node_mem_used)", "used {{ip}}", "A"),
            target("sum by (ip) (ray_node_mem_total)", "total {{ip}}", "B")], "bytes",
            "Memory used and total per node.", width=6),
        timeseries("GPU memory", [
            target("sum by (ip, GpuIndex) (ray_node_gram_used) * 1024 * 1024",
                   "used {{ip}} gpu {{GpuIndex}}", "A"),
            target("sum by (ip, GpuIndex) (ray_node_gram_used + ray_node_gram_available) * 1024 * 1024",
                   "total {{ip}} gpu {{GpuIndex}}", "B")], "bytes",
            "GPU memory used and total per GPU (Ray reports MiB). Empty on nodes without GPUs.",
            width=6),
        timeseries("GPU utilisation", [target(
            "avg by (ip, GpuIndex) (ray_node_gpus_utilization)", "{{ip}} gpu {{GpuIndex}}")],
            "percent", "Empty on nodes without GPUs.", width=6),
    ]


def panels() -> list[dict[str, Any]]:
    return [*traffic_panels(), *engine_panels(), *serve_panels(), *model_panels(), *job_panels(),
            *node_panels()]


def layout(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numbers the panels and places them left to right, 8 units high, rows full width."""
    x = y = 0
    height = 0
    out = []
    for panel_id, panel in enumerate(items, start=1):
        width = panel.pop("_width")
        tall = 1 if panel["type"] == "row" else 8
        if x + width > 24:
            x, y = 0, y + height
            height = 0
        panel["id"] = panel_id
        panel["gridPos"] = {"h": tall, "w": width, "x": x, "y": y}
        x += width
        height = max(height, tall)
        if panel["type"] == "row":
            x, y, height = 0, y + tall, 0
        out.append(panel)
    return out


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query", "name": name, "label": label, "datasource": DATASOURCE,
        "definition": query, "query": {"query": query, "refId": f"{name}-values"},
        "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2, "sort": 1, "regex": "", "hide": 0, "options": [],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "raydiance", "title": "Raydiance", "tags": ["raydiance", "ray", "serve"],
        "description": "Raydiance on Ray Serve: traffic, stages, the Denoiser engine, replicas, nodes.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "timezone": "",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": []},
            variable("application", "Application",
                     "label_values(ray_serve_deployment_replica_healthy, application)"),
            variable("deployment", "Deployment", "label_values(ray_serve_deployment_replica_healthy"
                     '{application=~"$application"}, deployment)'),
        ]},
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
