"""Shared test fixtures. Real data is read from ../shared/data beside the checkout (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONENIP_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (iad-mix, textures). Missing data is a test failure, not a skip."""
    path = SHARED / "data"
    assert (path / "iad-mix").is_dir(), f"benchmark data not found at {path}; set ONENIP_SHARED to the shared folder"
    return path


@pytest.fixture(scope="session")
def iad_mix(shared_data: Path) -> Path:
    return shared_data / "iad-mix"


@pytest.fixture(scope="session")
def textures(shared_data: Path) -> Path:
    return shared_data / "textures"
