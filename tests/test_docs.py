"""The documentation: the mkdocs site builds with --strict and no warning; the README stays a short user guide; no
document or source file points into the project's private workshop folder beside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 12 * 1024
# Split so that this file does not hold the strings it looks for.
FORBIDDEN = ("../" + "shared", "/work/" + "shared")


def mkdocs_command() -> list[str] | None:
    """How to run mkdocs: the script beside this Python, or on PATH; None when mkdocs is not installed."""
    beside = Path(sys.executable).with_name("mkdocs")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("mkdocs")
    if found:
        return [found]
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "mkdocs"]


def test_site_builds_strict_without_warnings(tmp_path: Path) -> None:
    command = mkdocs_command()
    if command is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    try:
        import material  # noqa: F401
    except ImportError:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [*command, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    warnings = [line for line in output.splitlines() if line.lstrip().startswith(("WARNING", "ERROR"))]
    assert not warnings, "mkdocs warned:\n" + "\n".join(warnings)
    for page in ("index", "method", "differences", "data", "usage", "deployment", "benchmarks"):
        target = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert target.is_file(), f"{page}.md was not built"


def documents() -> list[Path]:
    files = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "src").rglob("*.py"))
    return [f for f in files if f.is_file()]


def test_readme_is_short_and_nothing_points_to_the_workshop() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES} (move details into docs/)"
    offenders = []
    for path in documents():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(s in line for s in FORBIDDEN):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "points to the private workshop folder:\n" + "\n".join(offenders)
