"""Helpers for the observability tests: a real Prometheus process, scraping, PromQL, polling.

Every wait here has a deadline: a test that cannot get its data fails with what it last saw
instead of hanging.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import METRICS, MetricSpec

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "cluster" / "grafana" / "dashboards" / "raydiance.json"
CLUSTER_README = REPO / "cluster" / "README.md"

# How the tests fill Grafana's variables: every application and deployment, a rate window that
# covers the test's traffic (Prometheus scrapes every second here), a range for the load panels.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h",
                     "$application": ".*", "$deployment": ".*"}

T = TypeVar("T")


def poll(fn: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    """Call ``fn`` until it returns something truthy; raise with its last value after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = fn()
            if last:
                return last
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as error:
            last = error
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: nothing after {timeout_s:.0f}s (last: {last!r})")
        time.sleep(interval_s)


# --- Ray's metrics endpoint ---------------------------------------------------------------------

@dataclass
class Scrape:
    """One scrape of Ray's metrics port: samples by name, as (labels, value) pairs."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Scrape":
        scrape = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scrape.samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        return scrape

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        return sum(value for series_labels, value in self.samples.get(name, ())
                   if all(series_labels.get(k) == v for k, v in labels.items()))

    def present(self, spec: MetricSpec) -> bool:
        sample = {"counter": spec.scraped, "gauge": spec.scraped,
                  "histogram": f"{spec.scraped}_bucket"}[spec.kind]
        return sample in self.samples

    def label_keys(self, spec: MetricSpec) -> set[str]:
        name = spec.scraped + ("_bucket" if spec.kind == "histogram" else "")
        return {key for labels, _ in self.samples.get(name, ()) for key in labels}


def scrape(metrics_url: str) -> Scrape:
    response = httpx.get(metrics_url, timeout=10.0)
    response.raise_for_status()
    return Scrape.parse(response.text)


# --- a Prometheus process -----------------------------------------------------------------------

def prometheus_binary() -> str | None:
    fallback = Path("/usr/bin/prometheus")  # Debian's, when /usr/bin is not on PATH
    return shutil.which("prometheus") or (str(fallback) if fallback.exists() else None)


class Prometheus:
    """A Prometheus on loopback with a 1 s scrape interval and its own storage under ``workdir``."""

    def __init__(self, binary: str, workdir: Path, targets: list[str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            return httpx.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200

        poll(ready, timeout_s, "prometheus ready")

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on a PromQL error)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data["resultType"]
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match})

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


# --- the dashboard and the docs -----------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def substitute(expr: str) -> str:
    """A panel's PromQL with Grafana's variables filled as a viewer with "All" selected sees it."""
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out.extend((inner, t) for t in inner.get("targets", []))
    return out


_LABEL_VALUES = re.compile(r"^label_values\((?P<match>.+),\s*(?P<label>\w+)\)$")


def parse_label_values(query: str) -> tuple[str, str]:
    """``label_values(metric{sel}, label)`` -> (series selector, label)."""
    found = _LABEL_VALUES.match(query.strip())
    assert found, f"not a label_values(metric, label) query: {query!r}"
    return found["match"].strip(), found["label"]


# A documented metric is a table row: | `ray_raydiance_x_total` | counter | `tag`, `tag` | meaning |
_DOC_ROW = re.compile(r"^\|\s*`(?P<name>ray_raydiance_\w+)`\s*\|\s*(?P<kind>\w+)\s*\|(?P<tags>[^|]*)\|")


def documented_metrics(text: str | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Scraped name -> (kind, tags) for every metric cluster/README.md's tables document."""
    text = CLUSTER_README.read_text() if text is None else text
    out = {}
    for line in text.splitlines():
        row = _DOC_ROW.match(line.strip())
        if row:
            tags = tuple(re.findall(r"`(\w+)`", row["tags"]))
            out[row["name"]] = (row["kind"], tags)
    return out


def specs_by_scraped_name() -> dict[str, MetricSpec]:
    return {spec.scraped: spec for spec in METRICS.values()}
