"""Every query of the Grafana dashboard, run by a real Prometheus against a real Raydiance.

Expressions are evaluated as Grafana would send them with "All" selected
(``tests.observability.prom.GRAFANA_VARIABLES``), through Prometheus' HTTP API.
"""
from __future__ import annotations

import time

from tests.observability.conftest import APP_NAME
from tests.observability.prom import dashboard_targets, load_dashboard, parse_label_values, substitute

# Panels drawn from Ray's GPU node metrics: no series exist on a cluster without GPUs.
GPU_PANELS = {"GPU memory", "GPU utilisation"}
STAGES = {"Ingress", "TextEncoder", "Denoiser", "VAEDecoder"}


def test_every_panel_query_returns_series(app, prometheus, traffic):
    pending = {(panel["title"], t["refId"]): substitute(t["expr"])
               for panel, t in dashboard_targets(load_dashboard())}
    gpu_only = {key for key in pending if key[0] in GPU_PANELS and not app.has_gpu}
    deadline = time.monotonic() + 45  # rates need two scrapes after the traffic's counters rose
    while True:
        for key, expr in list(pending.items()):
            result = prometheus.query(expr)  # a PromQL error raises here, whatever the deadline
            if result or key in gpu_only:
                del pending[key]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not pending, "dashboard queries with no series:\n" + "\n".join(
        f"  {title} [{ref}]: {pending[(title, ref)]}" for title, ref in sorted(pending))


def test_template_variables_resolve(prometheus, traffic):
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"] if v["type"] == "query"}
    assert set(variables) == {"application", "deployment"}
    values = {}
    for name, variable in variables.items():
        match, label = parse_label_values(variable["query"]["query"])
        assert variable["definition"] == variable["query"]["query"]
        values[name] = set(prometheus.label_values(label, substitute(match)))
        # The same selector through the series API: the variable's metric exists with that label.
        series = prometheus.api("series", **{"match[]": substitute(match)})
        assert series and all(label in s for s in series), name
    assert APP_NAME in values["application"]
    assert STAGES <= values["deployment"], values["deployment"]
