"""The dashboard JSON, the provisioning files, the Prometheus config and the metric docs, checked
without a cluster: well-formed, consistent with each other and with deployments/metrics.py."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from deployments.metrics import METRICS
from tests.observability.prom import (
    REPO,
    dashboard_targets,
    documented_metrics,
    load_dashboard,
    parse_label_values,
    substitute,
)

CLUSTER = REPO / "cluster"
DATASOURCE_UID = "${datasource}"


def test_committed_dashboard_is_the_generators_output():
    result = subprocess.run([sys.executable, str(CLUSTER / "grafana" / "make_dashboard.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_panel_ids_unique_and_every_panel_on_the_datasource_variable():
    dashboard = load_dashboard()
    panels = [inner for p in dashboard["panels"] for inner in [p, *p.get("panels", [])]]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        assert panel.get("datasource", {}).get("uid") == DATASOURCE_UID, panel["title"]
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == DATASOURCE_UID, (panel["title"], target["refId"])
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"
    assert len(panels) >= 20


def test_template_variables():
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("application", "deployment"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"]["uid"] == DATASOURCE_UID
        assert variable["includeAll"] and variable["allValue"] == ".*"
        parse_label_values(variable["query"]["query"])  # well-formed label_values(metric, label)


def test_every_expression_substitutes_cleanly_and_uses_known_metrics():
    known_prefixes = {spec.scraped for spec in METRICS.values()}
    for panel, target in dashboard_targets(load_dashboard()):
        expr = substitute(target["expr"])
        for name in set(re.findall(r"\bray_raydiance_\w+", expr)):
            base = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
            assert name in known_prefixes or base in known_prefixes, (panel["title"], name)


def test_the_issue_s_panels_are_there():
    titles = {p["title"] for p in load_dashboard()["panels"]}
    for wanted in ("Requests/s by endpoint", "Errors/s by endpoint and status", "Images/s",
                   "Request latency by endpoint (p50/p95/p99)", "Stage latency (p50/p95/p99)",
                   "First Block Cache hit ratio", "Steps/s computed vs cached",
                   "Rows per UNet forward", "Active and queued requests per deployment",
                   "Replicas per deployment", "Deployment health", "Loads (since start)",
                   "Node CPU", "Node memory", "GPU memory"):
        assert wanted in titles, wanted


def test_provisioning_points_at_the_dashboard_and_prometheus():
    compose = yaml.safe_load((CLUSTER / "docker-compose.yml").read_text())
    grafana_mounts = compose["services"]["grafana"]["volumes"]
    providers = yaml.safe_load((CLUSTER / "grafana/provisioning/dashboards/raydiance.yml").read_text())
    (provider,) = providers["providers"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana_mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_mounts
    (datasource,) = yaml.safe_load(
        (CLUSTER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"].endswith(":9090")
    prometheus = compose["services"]["prometheus"]
    assert "/tmp/ray:/tmp/ray:ro" in prometheus["volumes"]
    assert prometheus["network_mode"] == compose["services"]["grafana"]["network_mode"] == "host"


def test_prometheus_config_scrapes_ray_service_discovery():
    config = yaml.safe_load((CLUSTER / "prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (it comes with Debian's prometheus package)")
    result = subprocess.run([promtool, "check", "config", str(CLUSTER / "prometheus/prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_documents_exactly_the_defined_metrics():
    documented = documented_metrics()
    defined = {spec.scraped: (spec.kind, spec.tags) for spec in METRICS.values()}
    assert documented == defined
