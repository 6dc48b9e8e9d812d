"""The shape of the code itself: no import cycles, no overlong functions, layers kept apart,
and the processes that only route requests kept free of the model libraries.

Read from the source with ``ast`` (function-local imports count), so a
cycle hidden inside a function, a Ray import in ``pipeline/`` or a product module importing test
tooling fails here rather than in review.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("pipeline", "deployments")
PACKAGES = (*PRODUCT, "tools")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every project module ``name`` imports, wherever in the file (functions included)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in GRAPH[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    # A package's __init__ importing its own submodules is how packages export; a submodule
    # importing the package back is the cycle to avoid, and it shows up here as one.
    assert _cycles() == []


def _top_level_imports(path: Path) -> set[str]:
    """The top-level package of every absolute import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("pipeline", {"ray", "deployments", "tools", "tests", "bench"}),  # the engine runs without Ray
    ("deployments", {"tools", "tests", "bench"}),  # the product never needs its test tooling
])
def test_layers(package, forbidden):
    offenders = {name: sorted(_top_level_imports(path) & forbidden)
                 for name, path in MODULES.items() if name.split(".")[0] == package}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_no_function_over_60_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft")
_ROUTING_PROCESS = """
import json, sys
from deployments.app import build_app
from deployments.api.ingress import Ingress
from deployments.job_queue import JobQueue
build_app({"models": {"tiny-shapes": "models/tiny-shapes"}})
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
"""


def test_the_app_builder_and_the_routing_deployments_import_no_model_library():
    """``serve run`` builds the app in a Ray task, and the Ingress and JobQueue replicas only
    route requests: none of them may pay torch's, diffusers' or transformers' seconds of import
    at start-up (the stages import their heavy modules in their constructors). A module-level
    import of one, anywhere on their import paths, fails this."""
    done = subprocess.run([sys.executable, "-c", _ROUTING_PROCESS % (MODEL_LIBRARIES,)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
