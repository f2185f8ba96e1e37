"""Shared test fixtures, in two tiers.

Generated data (always available, made once per session under pytest's temporary folder):

- ``gen_data``: ``gen_folder/gen-mix``, a small MVTec-AD layout dataset drawn by
  `onenip.demo.dataset.make_demo_dataset` (categories weave, grain, disc, bracket; `GEN_TRAIN` training, `GEN_TEST_GOOD`
  good and `GEN_TEST_DEFECT` defective test images each, with masks, `GEN_SIZE` px square RGB PNGs). Deterministic.
- ``gen_textures``: ``gen_folder/textures``, a few small procedurally drawn RGB JPEGs (some in sub-folders, not all
  square), the stand-in for DTD as ``data.textures``.
- ``tiny_model``: a tiny model (`onenip.demo.run.tiny_config`) trained on two generated types; ``gen_batch``: 16 of
  their test images as the deployed model's uint8 input, with `torch_outputs` (what PyTorch's DeployModel computes on
  it), `assert_same_outputs` (an exported runtime computes the same) and `thresholds_in_widest_gaps` (decisions that
  are mixed and robust, so that agreement is a real test).

Tools: ``chromium``, a headless browser (skipped where it is not installed).

Real data (only where it is present; tests that need it are skipped otherwise, never failed):

- ``shared_data``: the folder holding ``iad-mix/`` and ``textures/``: ``$ONENIP_DATA`` when set (a folder that does not
  exist then means "no real data": there is no fallback), else ``$ONENIP_SHARED/data`` (default ``../shared/data``
  beside the checkout) unless ``ONENIP_NO_SHARED=1``.
- ``iad_mix``, ``textures``: its two sub-folders. Never copied into the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# The test networks are small: on a 2-core runner, handing every small op to a second OpenMP thread costs far more
# than it saves (measured here: 0.6 ms per small matmul with one thread, 16 ms with two).
torch.set_num_threads(1)

# -- generated data -----------------------------------------------------------------------------------------------------

GEN_CATEGORIES = ("bracket", "disc", "grain", "weave")  # sorted, as the readers list them
GEN_SIZE = 96  # not the tests' input size (64), so images are resized as real ones are
GEN_TRAIN = 20  # training images per category
GEN_TEST_GOOD = 5  # good test images per category
GEN_TEST_DEFECT = 6  # defective test images per category (two of each of the category's three defect types)
GEN_TEST = GEN_TEST_GOOD + GEN_TEST_DEFECT


@pytest.fixture(scope="session")
def gen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding the generated gen-mix/ and textures/, laid out as the real data folder."""
    return tmp_path_factory.mktemp("generated")


@pytest.fixture(scope="session")
def gen_data(gen_folder: Path) -> Path:
    """Root of the generated MVTec-layout dataset (read-only for tests: copy what you modify)."""
    from onenip.demo.dataset import make_demo_dataset

    root = gen_folder / "gen-mix"
    return make_demo_dataset(root, seed=0, image_size=GEN_SIZE, n_train=GEN_TRAIN, n_test_good=GEN_TEST_GOOD,
                             n_test_defect=GEN_TEST_DEFECT)


TEXTURE_FILES = (  # (relative path, width, height)
    ("banded/banded_0.jpg", 96, 128),
    ("banded/banded_1.jpg", 112, 112),
    ("chequered/chequered_0.jpg", 128, 96),
    ("chequered/chequered_1.jpg", 100, 100),
    ("blotchy/blotchy_0.jpg", 120, 90),
    ("blotchy/blotchy_1.jpg", 96, 96),
    ("rings_0.jpg", 112, 140),
    ("rings_1.jpg", 104, 104),
)


def _texture(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A width x height RGB uint8 texture of `kind` (banded, chequered, blotchy, rings), drawn from `rng`."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    if kind == "banded":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    elif kind == "chequered":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "blotchy":
        coarse = rng.random((height // 12 + 2, width // 12 + 2)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)) / 255.0
    else:  # rings
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / period)
    low, high = rng.uniform(0, 0.4, 3), rng.uniform(0.6, 1.0, 3)
    img = low + (high - low) * t[..., None] + rng.normal(0, 0.03, (height, width, 3))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def gen_textures(gen_folder: Path) -> Path:
    """A folder of generated texture JPEGs (`TEXTURE_FILES`), for ``data.textures``."""
    root = gen_folder / "textures"
    rng = np.random.default_rng(2024)
    for rel, width, height in TEXTURE_FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = path.stem.rsplit("_", 1)[0]
        Image.fromarray(_texture(kind, width, height, rng)).save(path, quality=90)
    return root


# -- real data ----------------------------------------------------------------------------------------------------------

HOW_TO_GET_REAL_DATA = ("set ONENIP_DATA to a folder holding iad-mix/ and textures/, or place them in "
                        "../shared/data beside the checkout")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, gen_data: Path, gen_textures: Path) -> Path:
    """model.safetensors of the tiny model (`onenip.demo.run.tiny_config`: 64 px, 3 training steps) trained on the
    generated types disc and weave, with its deployment (a quarter of the normal images held out for the thresholds).
    Read-only: copy it to change it."""
    from onenip.api import make_config
    from onenip.demo.run import tiny_config
    from onenip.training.trainer import Trainer

    run = tmp_path_factory.mktemp("tiny-model") / "run"
    cfg = make_config(None, [f"data.roots=[{gen_data}]", f"data.textures={gen_textures}", *tiny_config(),
                             f"output_dir={run}"])
    Trainer(cfg, progress=False).run()
    return run / "model.safetensors"


@pytest.fixture(scope="session")
def gen_batch(gen_data: Path) -> np.ndarray:
    """16 generated test images as the tiny model's input, uint8 (16, 3, 64, 64): per type of `TINY_TYPES` (in order)
    its first 4 good and first 4 defective ones. Read-only."""
    from onenip.data import read_sources
    from onenip.data.images import load_batch
    from onenip.demo.run import TINY_TYPES

    test = read_sources([str(gen_data)], "test", list(TINY_TYPES))
    chosen = [[s.image for s in test if s.category == cat and s.label == label][:4] for cat in TINY_TYPES for label in (0, 1)]
    return load_batch([path for group in chosen for path in group], 64)


def torch_outputs(model: torch.nn.Module, batch: np.ndarray) -> dict[str, np.ndarray]:
    """What a `DeployModel` computes on the uint8 `batch` (N, 3, S, S), as numpy arrays."""
    with torch.no_grad():
        return {k: v.numpy() for k, v in model(torch.from_numpy(batch)).items()}


MAP_ATOL = 1e-4  # float32 exports: largest |exported map - PyTorch map|
SCORE_RTOL = 1e-4


def assert_same_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """An export's outputs `got` (a runtime's, ONNX Runtime's, TorchScript's) against PyTorch's `want` in float32: every
    output of the file, in its order; maps within MAP_ATOL, scores within SCORE_RTOL, the rest as close; decisions,
    known and categories identical. Returns the largest map difference."""
    from onenip.deploy.runtimes import OUTPUT_NAMES

    assert list(got)[: len(OUTPUT_NAMES)] == list(OUTPUT_NAMES)
    assert got["map"].dtype == np.float32 and got["map"].shape == want["map"].shape
    diff = float(np.abs(got["map"].astype(np.float64) - want["map"]).max())
    assert diff <= MAP_ATOL, diff
    np.testing.assert_allclose(got["score"], want["score"], rtol=SCORE_RTOL, atol=0)
    np.testing.assert_allclose(got["normalized"], want["normalized"], rtol=SCORE_RTOL, atol=1e-6)
    np.testing.assert_allclose(got["similarity"], want["similarity"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["type_distance"], want["type_distance"], rtol=SCORE_RTOL, atol=1e-5)
    for key in ("anomalous", "known"):
        assert got[key].dtype == np.bool_ and np.array_equal(got[key], want[key]), key
    assert got["category"].dtype == np.int64 and np.array_equal(got["category"], want["category"])
    return diff


def thresholds_in_widest_gaps(checkpoint: Path, batch: np.ndarray, out: Path) -> Path:
    """`checkpoint` saved to `out` with each type's threshold in the widest gap between the scores of the images of
    `batch` that retrieve it: the decisions on them are mixed (a few training steps flag nothing) and no score lies
    near a threshold, so that identical decisions (of an export, or at a lower precision) are a real test."""
    from onenip.models.detector import Detector
    from onenip.models.inference import DeployModel

    det = Detector.load(checkpoint)
    scores = torch_outputs(DeployModel(det, det.deployment).eval(), batch)
    for i, cat in enumerate(det.deployment.categories):
        s = np.sort(scores["score"][scores["category"] == i].astype(np.float64))
        if s.size >= 2:
            k = int(np.argmax(np.diff(s)))
            det.deployment.thresholds[cat] = float((s[k] + s[k + 1]) / 2)
    return det.save(out)


def real_data_folder() -> tuple[Path | None, str]:
    """(the real data folder or None, where it was looked for)."""
    env = os.environ.get("ONENIP_DATA")
    if env:
        path = Path(env).expanduser()
        return (path if path.is_dir() else None), f"ONENIP_DATA={env}"
    if os.environ.get("ONENIP_NO_SHARED", "") not in ("", "0"):
        return None, "ONENIP_NO_SHARED is set"
    path = Path(os.environ.get("ONENIP_SHARED", REPO.parent / "shared")) / "data"
    return (path if path.is_dir() else None), str(path)


def _real(sub: str) -> Path:
    folder, where = real_data_folder()
    if folder is None or not (folder / sub).is_dir():
        pytest.skip(f"real data {sub}/ not found ({where}); {HOW_TO_GET_REAL_DATA}")
    return folder / sub


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (iad-mix, textures); tests that need it are skipped when it is missing."""
    folder, where = real_data_folder()
    if folder is None:
        pytest.skip(f"real data not found ({where}); {HOW_TO_GET_REAL_DATA}")
    return folder


@pytest.fixture(scope="session")
def iad_mix() -> Path:
    """The real iad-mix benchmark (10 categories, MVTec layout); skipped when missing."""
    return _real("iad-mix")


@pytest.fixture(scope="session")
def textures() -> Path:
    """The real texture folder (DTD JPEGs); skipped when missing."""
    return _real("textures")


# -- tools --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (skips, before any model is trained, where it is not installed)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed: on Debian/Ubuntu run `apt-get install -y chromium`")
    return browser


TRAINING_CHILD = """
import logging, pathlib, sys, time
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(message)s")
from onenip.api import make_config
from onenip.training.trainer import Trainer
marker = pathlib.Path(sys.argv[1])
trainer = Trainer(make_config(None, sys.argv[2:]), progress=False)
step = trainer.train_step
def counted(batch):
    out = step(batch)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(trainer.step))
    tmp.replace(marker)  # atomic: the parent never reads a half-written count
    if trainer.step > len(trainer.loader):
        time.sleep(0.3)  # from epoch 2 on, slow enough that a loaded machine still stops it mid-epoch
    return out
trainer.train_step = counted
trainer.run()
"""


def training_child(tmp_path: Path, overrides: list[str], until_step: int) -> tuple[subprocess.Popen, Path]:
    """`onenip fit`'s Trainer with `overrides` in a child process, returned once it has taken `until_step` optimizer
    steps, still running (from the second epoch on it sleeps 0.3 s a step): (the child, the file its stderr (its log)
    goes to). A file, not a pipe: nobody reads the child's stderr while it trains, and a chatty child would block on a
    full pipe; the file is read once the child has ended (and shown here if it ends too early)."""
    script, marker, log = tmp_path / "child.py", tmp_path / "steps", tmp_path / "child-stderr.txt"
    script.write_text(TRAINING_CHILD)
    with log.open("wb") as stderr:  # the child holds its own handle on the file
        child = subprocess.Popen([sys.executable, str(script), str(marker), *overrides],
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=stderr)
    deadline = time.time() + 240
    while time.time() < deadline and child.poll() is None:
        text = marker.read_text().strip() if marker.exists() else ""
        if text and int(text) >= until_step:
            break
        time.sleep(0.02)
    assert child.poll() is None, (f"the training child ended before it reached step {until_step}; its stderr:\n"
                                  + log.read_text(errors="replace"))
    return child, log
