"""The runtime never imports the benchmark: bench/ (load generators, demo servers) uses app/, api/,
agents/ and schemas/, never the other way round. `sluice bench` execs `python -m bench` and
`sluice run` starts its demo tool server as a process, so no module of the runtime needs to import
it; this keeps it so."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.procs import ROOT

RUNTIME = ("app", "api", "agents", "schemas")
FORBIDDEN = "bench"


def _is_forbidden(module: str | None) -> bool:
    return module is not None and (module == FORBIDDEN or module.startswith(f"{FORBIDDEN}."))


def bench_imports(source: str, filename: str = "<source>") -> list[str]:
    """Every import of ``bench`` or ``bench.*`` in ``source``, as ``line: statement``: ``import``
    and ``from ... import`` statements (at any depth, also under ``if TYPE_CHECKING``) and
    ``importlib.import_module``/``__import__`` calls with the name as a literal."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # a relative import (level > 0) names a module of the importing package, not bench/
            names = [node.module or ""] if node.level == 0 else []
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (
                    isinstance(node.func, ast.Name)
                    and node.func.id in ("import_module", "__import__")
                )
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        if any(_is_forbidden(name) for name in names):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def _runtime_files() -> list[Path]:
    return sorted(path for package in RUNTIME for path in (ROOT / package).rglob("*.py"))


def test_the_runtime_packages_are_all_there() -> None:
    files = _runtime_files()
    for package in RUNTIME:
        assert (ROOT / package / "__init__.py") in files, package
    assert (ROOT / "app" / "cli.py") in files


@pytest.mark.parametrize("path", _runtime_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_runtime_module_imports_bench(path: Path) -> None:
    assert bench_imports(path.read_text(), str(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import bench",
        "import bench.cli as c",
        "import os, bench.relay",
        "from bench import cli",
        "from bench.demo_tools import DemoToolServer",
        "def f():\n    from bench.cli import bench_cli",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import bench.context",
        "import importlib\nimportlib.import_module('bench.cli')",
        "__import__('bench')",
    ],
)
def test_the_check_sees_every_spelling_of_an_import(source: str) -> None:
    assert len(bench_imports(source)) == 1


@pytest.mark.parametrize(
    "source",
    [
        "import benchmark",
        "from benchmarks import x",
        "from . import bench",  # app.bench, were there one: not the top-level package
        "from .bench import x",
        "cmd = ['python', '-m', 'bench.demo_tools']",  # a process, not an import
        "bench = 1",
    ],
)
def test_the_check_leaves_other_names_alone(source: str) -> None:
    assert bench_imports(source) == []
