"""A small synthetic multi-category anomaly-detection dataset for `onenip demo` (no download, no user data).

`make_demo_dataset` writes an MVTec-AD style folder::

    root/<category>/train/good/000.png ...
    root/<category>/test/good/000.png ...
    root/<category>/test/<defect_type>/000.png ...
    root/<category>/ground_truth/<defect_type>/000_mask.png      (uint8 0/255, same size as the image)
    root/demo_dataset.json                                      (the arguments; written last)

Every image is drawn procedurally with vectorised numpy from a seed, so a dataset is byte-identical for the same
arguments, and the default one (4 categories, 296 images of 128 x 128) takes a few seconds on a laptop CPU.

The categories and defect types, and how each is drawn: `onenip.demo_scenes`.

Ground truth: the clean image and its defective version are rendered from the same random state; the mask is the set
of pixels whose 8-bit value changed by at least `MASK_THRESHOLD` in some channel (holes in it filled), and outside the
mask the written defective image equals the clean one exactly. Defects are redrawn (deterministically) until the mask
covers 0.3 %-8 % of the image. `render_pair` exposes the clean/defective pair for tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image
from scipy import ndimage

from onenip.demo.scenes import CATEGORIES, DEFECT_TYPES, DEFECTS, SCENES
from onenip.errors import ConfigError, DatasetError

__all__ = [
    "CATEGORIES",
    "DEFECT_TYPES",
    "MARKER_NAME",
    "MASK_THRESHOLD",
    "MAX_AREA",
    "MIN_AREA",
    "make_demo_dataset",
    "render_good",
    "render_pair",
]

MARKER_NAME = "demo_dataset.json"
"""File recording the generation arguments; written last, so its presence means the dataset is complete."""

MASK_THRESHOLD = 12
"""A pixel belongs to a defect mask when some channel changed by at least this many 8-bit levels."""

GENERATOR_VERSION = 1
"""Bumped whenever the drawing (`onenip.demo_scenes`) changes, so an old dataset on disk is regenerated."""

MIN_AREA = 0.003
"""Smallest defect-mask area, as a fraction of the image."""

MAX_AREA = 0.08
"""Largest defect-mask area, as a fraction of the image."""

_MAX_TRIES = 40
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}

Seed: TypeAlias = int | Sequence[int]


# --------------------------------------------------------------------------------------------------------------------
# Public rendering
# --------------------------------------------------------------------------------------------------------------------


def _disk(radius: float) -> np.ndarray:
    """Boolean disk structuring element of the given radius in pixels."""
    r = max(1, int(round(radius)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r + 0.5


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _rng(seed: Seed) -> np.random.Generator:
    entropy = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if any(s < 0 for s in entropy):
        raise ConfigError(f"demo data seed must be non-negative, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _check_category(category: str) -> None:
    if category not in SCENES:
        raise ConfigError(f"unknown demo category {category!r}; expected one of {', '.join(CATEGORIES)}")


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ConfigError(f"demo image_size must be an integer >= 32, got {image_size!r}")


def render_good(category: str, seed: Seed, image_size: int = 128) -> np.ndarray:
    """A defect-free `image_size` x `image_size` x 3 uint8 image of `category`, determined by `seed`.

    `seed` is an int or a sequence of non-negative ints (fed to `numpy.random.SeedSequence`).
    """
    _check_category(category)
    _check_size(image_size)
    scene = SCENES[category](_rng(seed), int(image_size))
    img, _ = scene.render()
    return _to_u8(img + scene.noise)


def render_pair(
    category: str, defect_type: str, seed: Seed, image_size: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a clean image and its defective twin from the same random state.

    Returns ``(clean, defective, mask)``: two H x W x 3 uint8 images and an H x W bool mask. `clean` equals
    ``render_good(category, seed, image_size)``; `defective` equals `clean` exactly outside `mask`; `mask` is the set of
    pixels whose value changed by at least `MASK_THRESHOLD` in some channel, with enclosed holes filled, and covers
    between `MIN_AREA` and `MAX_AREA` of the image (the defect is redrawn, deterministically, until it does).
    """
    _check_category(category)
    _check_size(image_size)
    if defect_type not in DEFECT_TYPES[category]:
        raise ConfigError(
            f"unknown defect type {defect_type!r} for demo category {category!r}; "
            f"expected one of {', '.join(DEFECT_TYPES[category])}"
        )
    s = int(image_size)
    rng = _rng(seed)
    scene = SCENES[category](rng, s)
    clean_f, cov = scene.render()
    clean = _to_u8(clean_f + scene.noise)
    fallback: tuple[np.ndarray, np.ndarray] | None = None
    for _ in range(_MAX_TRIES):
        raw = _to_u8(DEFECTS[defect_type](rng, scene, clean_f, cov) + scene.noise)
        changed = np.abs(raw.astype(np.int16) - clean.astype(np.int16)).max(axis=2) >= MASK_THRESHOLD
        if defect_type == "misweave":  # the bent region, not just the thread pixels that happen to change colour
            changed |= ndimage.binary_closing(changed, structure=_disk(scene.params["period"] / 2.0))
        mask = ndimage.binary_fill_holes(changed)
        area = float(mask.mean())
        if not mask.any():
            continue
        defective = np.where(mask[..., None], raw, clean)
        if MIN_AREA <= area <= MAX_AREA:
            return clean, defective, mask
        if fallback is None or abs(np.log(area / 0.02)) < abs(np.log(float(fallback[1].mean()) / 0.02)):
            fallback = (defective, mask)
    if fallback is None:  # pragma: no cover - every defect draws a visible change long before this
        raise RuntimeError(f"could not draw a visible {defect_type} defect on {category} (seed {seed!r})")
    return clean, fallback[0], fallback[1]


# --------------------------------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------------------------------


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _expected_files(spec: dict[str, Any]) -> list[str]:
    files = []
    for cat in spec["categories"]:
        files += [f"{cat}/train/good/{i:03d}.png" for i in range(spec["n_train"])]
        files += [f"{cat}/test/good/{i:03d}.png" for i in range(spec["n_test_good"])]
        types = DEFECT_TYPES[cat]
        for i in range(spec["n_test_defect"]):
            t, j = types[i % len(types)], i // len(types)
            files += [f"{cat}/test/{t}/{j:03d}.png", f"{cat}/ground_truth/{t}/{j:03d}_mask.png"]
    return files


def _is_complete(root: Path, spec: dict[str, Any]) -> bool:
    marker = root / MARKER_NAME
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if recorded != spec:
        return False
    return all((root / f).is_file() for f in _expected_files(spec))


def _is_replaceable(root: Path) -> bool:
    """True when `root` is missing, empty, or looks like a demo dataset (ours to delete and redraw)."""
    if not root.exists():
        return True
    if not root.is_dir():
        return False
    names = {p.name for p in root.iterdir()}
    if not names:
        return True
    marker = root / MARKER_NAME
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("generator") == "onenip.demo_data":
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return names <= set(CATEGORIES) | {MARKER_NAME}


def _write_dataset(out: Path, spec: dict[str, Any]) -> None:
    seed, s = spec["seed"], spec["image_size"]
    for ci, cat in enumerate(spec["categories"]):
        train = out / cat / "train" / "good"
        test_good = out / cat / "test" / "good"
        train.mkdir(parents=True)
        test_good.mkdir(parents=True)
        for i in range(spec["n_train"]):
            _save_png(train / f"{i:03d}.png", render_good(cat, (seed, ci, _SPLIT_CODES["train"], i), s))
        for i in range(spec["n_test_good"]):
            _save_png(test_good / f"{i:03d}.png", render_good(cat, (seed, ci, _SPLIT_CODES["test_good"], i), s))
        types = DEFECT_TYPES[cat]
        for i in range(spec["n_test_defect"]):
            t, j = types[i % len(types)], i // len(types)
            img_dir, gt_dir = out / cat / "test" / t, out / cat / "ground_truth" / t
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            _, defective, mask = render_pair(cat, t, (seed, ci, _SPLIT_CODES["test_defect"], i), s)
            _save_png(img_dir / f"{j:03d}.png", defective)
            _save_png(gt_dir / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
    # the marker goes last: its presence means every file above is complete
    (out / MARKER_NAME).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"demo dataset {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 12,
) -> Path:
    """Write the synthetic demo dataset (MVTec-AD layout, see the module docstring) under `root` and return it.

    If `root` already holds a complete dataset made with the same arguments (recorded in ``root/demo_dataset.json``,
    written last) it is returned untouched. Otherwise the dataset is generated from scratch in a temporary sibling
    folder and renamed into place, so a partial dataset never looks complete. An existing `root` is replaced only if
    it is empty or looks like a demo dataset; anything else raises `DatasetError` rather than deleting user files.

    Args:
        root: Output folder (created with its parents if missing).
        seed: Non-negative random seed; the same arguments give byte-identical PNG files.
        image_size: Side of the square images in pixels (>= 32).
        n_train: Defect-free training images per category (>= 1).
        n_test_good: Defect-free test images per category.
        n_test_defect: Defective test images per category; the category's defect types alternate over them.
    """
    spec = {
        "generator": "onenip.demo_data",
        "generator_version": GENERATOR_VERSION,
        "categories": list(CATEGORIES),
        "seed": _check_count("seed", seed, 0),
        "image_size": _check_count("image_size", image_size, 32),
        "n_train": _check_count("n_train", n_train, 1),
        "n_test_good": _check_count("n_test_good", n_test_good, 0),
        "n_test_defect": _check_count("n_test_defect", n_test_defect, 0),
    }
    root = Path(root).expanduser().absolute()
    if _is_complete(root, spec):
        return root
    if not _is_replaceable(root):
        raise DatasetError(
            f"{root} exists and holds files that are not a demo dataset; refusing to overwrite it "
            "(choose an empty or new folder)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_dataset(tmp, spec)
        if _is_complete(root, spec):  # another process finished the same dataset meanwhile
            return root
        if root.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, trash / "old")
            os.replace(tmp, root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
