"""Tests of the synthetic demo dataset generator (`onenip.demo_data`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip.demo import dataset as demo_data
from onenip.demo.dataset import (
    CATEGORIES,
    DEFECT_TYPES,
    MARKER_NAME,
    MASK_THRESHOLD,
    make_demo_dataset,
    render_good,
    render_pair,
)
from onenip.errors import ConfigError, DatasetError

SMALL = {"image_size": 64, "n_train": 3, "n_test_good": 2, "n_test_defect": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, **SMALL)


# ---- layout ---------------------------------------------------------------------------------------------------------


def test_categories_are_two_textures_and_two_objects() -> None:
    assert len(CATEGORIES) == 4 and len(set(CATEGORIES)) == 4
    assert set(DEFECT_TYPES) == set(CATEGORIES)
    for cat in CATEGORIES:
        assert 2 <= len(DEFECT_TYPES[cat]) <= 3
        assert "good" not in DEFECT_TYPES[cat]


def test_layout_and_counts(small_dataset: Path) -> None:
    root = small_dataset
    assert sorted(p.name for p in root.iterdir()) == sorted([*CATEGORIES, MARKER_NAME])
    for cat in CATEGORIES:
        types = DEFECT_TYPES[cat]
        assert sorted(p.name for p in (root / cat).iterdir()) == ["ground_truth", "test", "train"]
        assert [p.name for p in (root / cat / "train").iterdir()] == ["good"]
        assert sorted(p.name for p in (root / cat / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (root / cat / "test" / "good").iterdir()) == ["000.png", "001.png"]
        # 4 defective images alternate over the types: the first type gets 2 when there are 3 types
        expected = {t: sum(1 for i in range(4) if i % len(types) == k) for k, t in enumerate(types)}
        test_dirs = sorted(p.name for p in (root / cat / "test").iterdir())
        assert test_dirs == sorted(["good", *expected])
        assert sorted(p.name for p in (root / cat / "ground_truth").iterdir()) == sorted(expected)
        for t, n in expected.items():
            imgs = sorted(p.name for p in (root / cat / "test" / t).iterdir())
            masks = sorted(p.name for p in (root / cat / "ground_truth" / t).iterdir())
            assert imgs == [f"{j:03d}.png" for j in range(n)]
            assert masks == [f"{j:03d}_mask.png" for j in range(n)]
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["seed"] == 0 and marker["image_size"] == 64 and marker["n_train"] == 3
    assert not [p for p in root.parent.iterdir() if p != root], "temporary folders were left behind"


def test_images_and_masks(small_dataset: Path) -> None:
    size = SMALL["image_size"]
    n_masks = 0
    for img_path in small_dataset.rglob("*.png"):
        if img_path.parent.parent.name == "ground_truth":
            continue
        with Image.open(img_path) as im:
            assert im.mode == "RGB" and im.size == (size, size), img_path
        if img_path.parent.name == "good":
            continue
        defect = img_path.parent.name
        mask_path = small_dataset / img_path.parts[-4] / "ground_truth" / defect / f"{img_path.stem}_mask.png"
        with Image.open(mask_path) as mk:
            assert mk.mode == "L" and mk.size == (size, size), mask_path
            mask = np.asarray(mk)
        assert set(np.unique(mask).tolist()) == {0, 255}, mask_path  # binary and non-empty
        area = float((mask == 255).mean())
        assert demo_data.MIN_AREA <= area <= demo_data.MAX_AREA, (mask_path, area)
        n_masks += 1
    assert n_masks == 4 * SMALL["n_test_defect"]


# ---- clean / defective twins ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("category,defect", [(c, t) for c in CATEGORIES for t in DEFECT_TYPES[c]])
def test_defect_changes_exactly_the_mask(category: str, defect: str) -> None:
    for seed in range(4):
        clean, defective, mask = render_pair(category, defect, (7, seed), 96)
        assert clean.shape == defective.shape == (96, 96, 3) and clean.dtype == defective.dtype == np.uint8
        assert mask.shape == (96, 96) and mask.dtype == bool
        np.testing.assert_array_equal(clean, render_good(category, (7, seed), 96))
        diff = np.abs(clean.astype(np.int16) - defective.astype(np.int16)).max(axis=2)
        assert mask.any()
        assert (diff[~mask] == 0).all(), "pixels outside the mask changed"
        changed = (diff[mask] >= MASK_THRESHOLD).mean()
        # the misweave mask is the bent region, in which some thread pixels keep their colour by chance
        assert changed >= (0.5 if defect == "misweave" else 0.9), changed
        assert demo_data.MIN_AREA <= mask.mean() <= demo_data.MAX_AREA


def test_defect_types_differ_from_each_other() -> None:
    for cat in CATEGORIES:
        masks = [render_pair(cat, t, 3, 64)[2] for t in DEFECT_TYPES[cat]]
        defectives = [render_pair(cat, t, 3, 64)[1] for t in DEFECT_TYPES[cat]]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not np.array_equal(masks[i], masks[j]) or not np.array_equal(defectives[i], defectives[j])


def test_render_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="category"):
        render_good("carpet", 0)
    with pytest.raises(ConfigError, match="defect"):
        render_pair("weave", "missing", 0)
    with pytest.raises(ConfigError, match="image_size"):
        render_good("weave", 0, image_size=8)
    with pytest.raises(ConfigError, match="seed"):
        render_good("weave", -1)


# ---- determinism ----------------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(small_dataset: Path, tmp_path: Path) -> None:
    again = make_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    assert _files(again) == _files(small_dataset)


def test_different_seed_gives_different_images(small_dataset: Path, tmp_path: Path) -> None:
    other = _files(make_demo_dataset(tmp_path / "other", seed=1, **SMALL))
    base = _files(small_dataset)
    assert other.keys() == base.keys()
    pngs = [k for k in base if k.endswith(".png") and "ground_truth" not in k]
    assert all(other[k] != base[k] for k in pngs)


# ---- caching and regeneration ---------------------------------------------------------------------------------------


def test_complete_dataset_is_not_regenerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_demo_dataset(tmp_path / "d", seed=2, **SMALL)
    before = _mtimes(root)
    inode = root.stat().st_ino

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(demo_data, "_write_dataset", boom)
    assert make_demo_dataset(root, seed=2, **SMALL) == root
    assert make_demo_dataset(str(root), seed=2, **SMALL) == root
    assert _mtimes(root) == before
    assert root.stat().st_ino == inode


def _sentinel(root: Path) -> Path:
    path = root / CATEGORIES[0] / "train" / "good" / "stale.txt"
    path.write_text("left over")
    return path


def test_missing_marker_regenerates(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", seed=2, **SMALL)
    reference = _files(root)
    (root / MARKER_NAME).unlink()
    stale = _sentinel(root)
    (root / CATEGORIES[1] / "train" / "good" / "000.png").write_bytes(b"truncated")
    assert make_demo_dataset(root, seed=2, **SMALL) == root
    assert not stale.exists(), "regeneration did not start from scratch"
    assert _files(root) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_different_marker_regenerates(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", seed=2, **SMALL)
    stale = _sentinel(root)
    marker = json.loads((root / MARKER_NAME).read_text())
    marker["seed"] = 3
    (root / MARKER_NAME).write_text(json.dumps(marker))
    make_demo_dataset(root, seed=2, **SMALL)
    assert not stale.exists()
    assert json.loads((root / MARKER_NAME).read_text())["seed"] == 2


def test_other_arguments_regenerate(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", seed=2, **SMALL)
    make_demo_dataset(root, seed=2, **{**SMALL, "n_train": 2})
    assert sorted(p.name for p in (root / CATEGORIES[0] / "train" / "good").iterdir()) == ["000.png", "001.png"]
    assert json.loads((root / MARKER_NAME).read_text())["n_train"] == 2


def test_marker_with_missing_file_regenerates(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", seed=2, **SMALL)
    victim = root / CATEGORIES[2] / "test" / "good" / "001.png"
    victim.unlink()
    make_demo_dataset(root, seed=2, **SMALL)
    assert victim.is_file()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="refusing"):
        make_demo_dataset(root, **SMALL)
    assert (root / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    assert make_demo_dataset(root, **{**SMALL, "n_test_defect": 0}) == root
    assert (root / MARKER_NAME).is_file()
    assert not (root / CATEGORIES[0] / "ground_truth").exists()


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    for kwargs in ({"n_train": 0}, {"image_size": 16}, {"seed": -1}, {"n_test_good": -1}, {"n_train": 2.5}):
        with pytest.raises(ConfigError):
            make_demo_dataset(tmp_path / "bad", **{**SMALL, **kwargs})  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()


# ---- variation ------------------------------------------------------------------------------------------------------


def test_images_vary_within_a_category(small_dataset: Path) -> None:
    for cat in CATEGORIES:
        imgs = [_load(p).astype(np.float32) for p in sorted((small_dataset / cat / "train" / "good").iterdir())]
        imgs += [_load(p).astype(np.float32) for p in sorted((small_dataset / cat / "test" / "good").iterdir())]
        for i in range(len(imgs)):
            for j in range(i + 1, len(imgs)):
                # more than sensor noise: pose, phase, colour or lighting differ
                assert np.abs(imgs[i] - imgs[j]).mean() > 4.0, (cat, i, j)


def test_categories_differ(small_dataset: Path) -> None:
    means = {}
    for cat in CATEGORIES:
        imgs = np.stack([_load(p) for p in sorted((small_dataset / cat / "train" / "good").iterdir())])
        means[cat] = imgs.astype(np.float32).mean(axis=(0, 1, 2))  # mean colour of the category
    for i, a in enumerate(CATEGORIES):
        for b in CATEGORIES[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 15.0, (a, b, means[a], means[b])


def test_default_size_images_are_colour_and_textured() -> None:
    for cat in CATEGORIES:
        img = render_good(cat, 0).astype(np.float32)
        assert img.shape == (128, 128, 3)
        assert np.abs(img[..., 0] - img[..., 2]).mean() > 3.0 or cat == "disc"  # colour (the disc is grey metal)
        assert img.std() > 10.0


def test_default_dataset_is_fast(tmp_path: Path) -> None:
    """The default dataset (4 categories x 74 images of 128 px) takes a few seconds; allow a slow machine 5x."""
    import time

    t0 = time.perf_counter()
    root = make_demo_dataset(tmp_path / "full")
    elapsed = time.perf_counter() - t0
    assert sum(1 for _ in root.rglob("*.png")) == 4 * (40 + 10 + 12 + 12)
    assert elapsed < 20.0, elapsed
