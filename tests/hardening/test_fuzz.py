"""A property-based fuzz of the app's OpenAPI schema with schemathesis, against the real app.

``schemathesis run`` reads the served ``/openapi.json`` and, for every operation, sends its
boundary cases (the coverage phase) and random examples (the fuzzing phase), valid and invalid
against the schema. Every answer must be no 5xx, a status the schema declares for the operation,
in a declared content type, with a body matching the declared schema (the error body included).
Afterwards the service still serves.

Through the CLI, schemathesis' stable interface: its pytest loader for a schema served by a
fixture (``schemathesis.pytest.from_fixture``) fails on pytest 9.2 (it sets ``Function._nodeid``).
The app fuzzed is one of its own (route prefix ``/fuzz``) with small limits, so that the examples
that do generate are cheap: at most 20 steps, 64x64 pixels, 2 images.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

# The model's native 64x64 and the default 20 steps are within them: a request that leaves its
# size and steps out generates, so the generation path is fuzzed too, not only the refusals.
FUZZ_LIMITS = {"max_width": 64, "max_height": 64, "max_steps": 20, "max_images": 2,
               "max_prompt_chars": 300, "max_input_bytes": 65536}
MAX_EXAMPLES = 25  # per operation in the fuzzing phase; a GET without parameters needs one
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")
SEED = 13  # the same examples every run: a failure here reproduces with the command it prints


@pytest.fixture(scope="module")
def fuzz_url(deploy_app) -> str:
    return deploy_app("fuzz", "/fuzz", limits=FUZZ_LIMITS)


def schemathesis_run(url: str, report: Path) -> list[str]:
    """The ``schemathesis run`` command line that fuzzes the app at ``url``."""
    return [sys.executable, "-m", "schemathesis.cli", "--no-color", "run", f"{url}/openapi.json",
            "--url", url, "--phases", "coverage,fuzzing", "--mode", "all",
            "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--checks", ",".join(CHECKS),
            "--generation-database", "none", "--request-timeout", "60", "--workers", "1",
            "--report", "json", "--report-json-path", str(report)]


def test_every_answer_is_documented_and_none_is_a_5xx(fuzz_url: str, tmp_path: Path):
    command = schemathesis_run(fuzz_url, tmp_path / "report.json")
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, f"{' '.join(command)}\n{run.stdout[-20000:]}\n{run.stderr[-5000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["operations"]["tested"] == report["operations"]["total"]  # every operation
    print(f"schemathesis: {report['test_cases']['generated']} requests over "
          f"{report['operations']['tested']} operations in {report['running_time']:.1f} s")


def test_the_service_still_serves_after_the_fuzz(fuzz_url: str):
    body = {"prompt": "a green square on a white background", "steps": 2, "seed": 1}
    response = httpx.post(f"{fuzz_url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
