"""The architecture as a test: each layer imports only from the layers below it, and the request path above
the engine runs without JAX.

Layers, lowest first (README, "Layout"): the model (grok1/: config, params, checkpoint formats, model math,
sampling, tokenizer) -> the engine API and the engine -> sharding/ -> planning/ (deployment sizing from the
sharding rules) -> workers/ -> cluster/ -> ingress/ -> the command line (cli/), which nothing imports.
Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODULES = {"grok1.engine_api", "grok1.slot_settings", "grok1.steps", "grok1.engine", "grok1.paged_engine"}
LAYERS = ["model", "engine", "sharding", "planning", "workers", "cluster", "ingress", "cli"]
PACKAGES = {"grok1": "model", "grok1_api": "model", "sharding": "sharding", "planning": "planning",
            "workers": "workers", "cluster": "cluster", "ingress": "ingress", "cli": "cli"}


def layer_of(module: str) -> str | None:
    if module in ENGINE_MODULES or any(module.startswith(m + ".") for m in ENGINE_MODULES):
        return "engine"
    return PACKAGES.get(module.split(".")[0])


def package_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, wherever it stands; relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; name the package")
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def upward_imports() -> list[str]:
    problems = []
    for module, path in package_modules().items():
        here = LAYERS.index(layer_of(module))
        for line, imported in imports_of(path):
            there = layer_of(imported)
            if there is not None and LAYERS.index(there) > here:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {layer_of(module)} imports {imported} ({there})")
    return problems


def test_every_import_points_down():
    problems = upward_imports()
    assert not problems, "imports that point up a layer:\n" + "\n".join(problems)


def test_the_walker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from ingress.app import build_app\n")
    assert (4, "ingress.app") in imports_of(source)
    assert layer_of("ingress.app.build_app") == "ingress" and layer_of("grok1.engine_api") == "engine"
    assert layer_of("grok1.model") == "model" and layer_of("numpy") is None
    assert layer_of("planning.plan") == "planning" and layer_of("workers.local_processes") == "workers"


def test_nothing_imports_the_command_line():
    for path in [*ROOT.joinpath("benchmarks").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]:
        if path.name == "test_layering.py":
            continue
        for line, imported in imports_of(path):
            if layer_of(imported) == "cli" and not path.name.startswith("test_"):
                pytest.fail(f"{path.relative_to(ROOT)}:{line} imports the command line")


def test_router_and_ingress_load_without_jax():
    """The router actor and the ingress replicas never run the model: they must not pay for JAX."""
    code = ("import sys, cluster.router, cluster.scheduler, ingress.app, ingress.protocol, ingress.generation; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')); "
            "print(bad[:5]); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"JAX was imported: {result.stdout}{result.stderr[-2000:]}"


def test_one_engine_protocol_for_the_engine_and_the_shard_group():
    from grok1.engine import Engine
    from grok1.engine_api import ENGINE_VERBS, PAGED_ENGINE_VERBS, EngineVerbs
    from grok1.paged_engine import PagedEngine
    from workers.group import GroupEngine

    assert issubclass(Engine, EngineVerbs) and issubclass(GroupEngine, EngineVerbs)
    assert all(callable(getattr(Engine, verb, None)) for verb in ENGINE_VERBS)  # what ShardWorker.execute runs
    assert all(callable(getattr(PagedEngine, verb, None)) for verb in PAGED_ENGINE_VERBS)
    assert all(callable(getattr(GroupEngine, verb, None)) for verb in PAGED_ENGINE_VERBS)


def test_tests_import_by_package_and_never_edit_sys_path():
    """Test modules and their helper scripts import each other as `tests.<folder>.<module>` (scripts run with
    `python -m`), so no test depends on which directory pytest happened to put on sys.path."""
    problems = []
    siblings = {path.stem for path in (ROOT / "tests").rglob("*.py")} - {"__init__"}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend")
                    and ast.unparse(node.value) == "sys.path"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: edits sys.path")
        problems += [f"{path.relative_to(ROOT)}:{line}: imports {module!r} by bare name"
                     for line, module in imports_of(path) if module.split(".")[0] in siblings]
    assert not problems, "\n".join(problems)
