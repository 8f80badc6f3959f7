"""The shape of the code that the worker-seams issue asked for, kept from drifting back.

- no module under app/ is over 700 lines;
- the runtime packages have no import cycle (imports that run at import time; those inside
  functions and under ``if TYPE_CHECKING`` are deliberate breaks and are left out);
- agents/ stay pure: they never import app/ or api/;
- importing any runtime module starts nothing: it works with an empty SLUICE_CONFIG_DIR and no broker.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ("app", "agents", "schemas", "api")
MAX_LINES = 700


def modules() -> dict[str, Path]:
    found = {}
    for package in RUNTIME:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _import_time_nodes(tree: ast.Module) -> Iterator[ast.stmt]:
    """Top-level statements that run at import: into if/try blocks, but not ``if TYPE_CHECKING``."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                stack[:0] = node.orelse
                continue
            stack[:0] = [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            stack[:0] = [*node.body, *node.orelse, *node.finalbody]
        else:
            yield node


def imports_at_import_time(name: str, path: Path, known: set[str]) -> set[str]:
    """The runtime modules ``name`` imports while it is being imported (packages included)."""
    targets: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _import_time_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first, except the packages that hold
    # ``name`` itself: those are already being imported when ``name`` runs.
    parts = name.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    closed = set()
    for target in targets:
        tparts = target.split(".")
        closed.update(".".join(tparts[:i]) for i in range(1, len(tparts) + 1))
    return {t for t in closed if t in known and t != name and t not in ancestors}


def test_no_module_in_app_is_over_700_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "app").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_runtime_has_no_import_cycle() -> None:
    found = modules()
    graph = {name: imports_at_import_time(name, path, set(found)) for name, path in found.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import a\nx = 1\n")
    (tmp_path / "c.py").write_text("import d\n")
    (tmp_path / "d.py").write_text("try:\n    import c\nexcept ImportError:\n    pass\n")
    known = {"a", "b", "c", "d"}
    graph = {m: imports_at_import_time(m, tmp_path / f"{m}.py", known) for m in known}
    assert graph == {"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}


def test_agents_import_no_app_or_api() -> None:
    found = modules()
    offenders = {}
    for name, path in found.items():
        if not name.startswith("agents"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad = [n for n in names if n.split(".")[0] in ("app", "api")]
            if bad:
                offenders[name] = bad
    assert offenders == {}


@pytest.mark.timeout(300)
def test_importing_any_runtime_module_starts_nothing(tmp_path: Path) -> None:
    """With no tenant files and a broker address nothing listens on, every module imports."""
    names = sorted(modules())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    env = {
        "PATH": "/usr/bin:/bin",
        "SLUICE_CONFIG_DIR": str(tmp_path / "empty"),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
    }
    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code, *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "state").exists()
