"""The package is layered by stage (data -> synthesis / models -> evaluation -> training / deploy -> api / report ->
demo -> cli), has no import cycles, and no module takes another module's private names.

The layers are declared once, as an import-linter contract in pyproject.toml (`lint-imports` checks them from the
repository root). Cycles and private imports are checked here on every import statement of the source, those inside
functions included (an import inside a function hides a cycle from Python, not from this test). Each check is also run
on a copy of the package with a planted violation, and must fail there.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(src: Path) -> dict[str, list[tuple[str, str | None, int]]]:
    """Per module of the onenip package under `src`: (imported module, imported name or None, line) of every import of
    onenip, wherever it stands. `from onenip.x import y` names module onenip.x.y when that is a module."""
    files = {module_name(p, src): p for p in (src / "onenip").rglob("*.py")}
    out: dict[str, list[tuple[str, str | None, int]]] = {}
    for mod, path in files.items():
        found: list[tuple[str, str | None, int]] = []
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "onenip"]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                if base.split(".")[0] != "onenip":
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub, None, node.lineno) if sub in files else (base, a.name, node.lineno))
        out[mod] = found
    return out


def cycles(graph: dict[str, list[tuple[str, str | None, int]]]) -> list[list[str]]:
    """The import cycles between modules (each as a list of modules, the first repeated at the end)."""
    edges = {m: sorted({t for t, _, _ in imps if t in graph and t != m}) for m, imps in graph.items()}
    found, state, stack = [], dict.fromkeys(edges, 0), []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state[t] == 1:
                found.append(stack[stack.index(t):] + [t])
            elif state[t] == 0:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if state[m] == 0:
            visit(m)
    return found


def private_imports(graph: dict[str, list[tuple[str, str | None, int]]]) -> list[str]:
    """`from onenip.a import _b` in any module other than onenip.a (a private name crossing a module boundary)."""
    return [f"{m}:{line} imports {name} from {t}" for m, imps in graph.items() for t, name, line in imps
            if name is not None and name.startswith("_") and not name.startswith("__") and t != m]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contract of pyproject.toml under `root`, on the package under root/src."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_no_import_cycles() -> None:
    assert cycles(imports_of(SRC)) == []


def test_no_private_names_across_modules() -> None:
    assert private_imports(imports_of(SRC)) == []


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_layers_contract_is_kept() -> None:
    res = lint_imports(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of the package in which the data layer imports the CLI (upward) and the CLI a private name of it."""
    shutil.copytree(SRC / "onenip", tmp_path / "src" / "onenip", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    files = tmp_path / "src" / "onenip" / "data" / "files.py"
    files.write_text(files.read_text() + "\n\ndef _planted():\n    from onenip.cli import main\n\n    return main\n")
    cli = tmp_path / "src" / "onenip" / "cli.py"
    cli.write_text(cli.read_text() + "\nfrom onenip.data.files import _planted  # noqa: E402\n")
    return tmp_path


def test_checks_fail_on_a_planted_violation(planted: Path) -> None:
    graph = imports_of(planted / "src")
    assert any("onenip.cli" in c and "onenip.data.files" in c for c in cycles(graph))
    assert any("_planted" in p for p in private_imports(graph))


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_layers_contract_fails_on_a_planted_violation(planted: Path) -> None:
    res = lint_imports(planted)
    assert res.returncode != 0
    assert "onenip.data is not allowed to import onenip.cli" in res.stdout, res.stdout
