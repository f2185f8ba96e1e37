"""Shared test fixtures. Real data is read from ../shared/data beside the checkout (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONENIP_SHARED", REPO.parent / "shared"))

# The test networks are small: on a 2-core runner, handing every small op to a second OpenMP thread costs far more
# than it saves (measured here: 0.6 ms per small matmul with one thread, 16 ms with two).
torch.set_num_threads(1)


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
