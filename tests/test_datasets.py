"""Tests of onenip.datasets on small layouts built in tmp_path, and on the real iad-mix benchmark."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import GEN_CATEGORIES, GEN_TEST, GEN_TEST_DEFECT, GEN_TEST_GOOD, GEN_TRAIN
from PIL import Image

from onenip.data import (
    Sample,
    detect_format,
    group_by_category,
    read_btad,
    read_jsonl,
    read_mvtec,
    read_source,
    read_sources,
    read_visa,
)
from onenip.errors import DatasetError

SIZE = (32, 24)  # width, height


def make_image(path: Path, size: tuple[int, int] = SIZE, color: tuple[int, int, int] = (40, 80, 120)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_mask(path: Path, size: tuple[int, int] = SIZE, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[2:6, 3:9] = value
    Image.fromarray(pixels).save(path)
    return path


def names(samples: list[Sample]) -> list[str]:
    """Each sample as category/defect/file name, to compare with expected lists."""
    return [f"{s.category}/{s.defect}/{s.image.name}" for s in samples]


# --------------------------------------------------------------------------------------------------------------------
# Layout builders
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """Two categories: bottle (png, masks <stem>_mask.png, one defect without mask) and screw (upper-case .JPG)."""
    root = tmp_path / "mvtec"
    for name in ("001.png", "000.png", "002.png"):
        make_image(root / "bottle" / "train" / "good" / name)
    (root / "bottle" / "train" / "good" / "notes.txt").write_text("not an image")
    make_image(root / "bottle" / "train" / "good" / ".hidden.png")
    make_image(root / "bottle" / "test" / "good" / "000.png")
    make_image(root / "bottle" / "test" / "broken_large" / "001.png")
    make_image(root / "bottle" / "test" / "broken_large" / "000.png")
    make_image(root / "bottle" / "test" / "contamination" / "000.png")
    make_mask(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    make_mask(root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png")
    # contamination/000.png has no mask on purpose
    make_image(root / "screw" / "train" / "good" / "010.JPG")
    make_image(root / "screw" / "test" / "good" / "011.JPG")
    make_image(root / "screw" / "test" / "thread" / "012.JPG")
    make_mask(root / "screw" / "ground_truth" / "thread" / "012.png")  # <stem>.<ext> naming
    (root / "license_files").mkdir()  # not a category: no train/ folder
    return root


@pytest.fixture
def visa(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    for cat in ("candle", "pcb1"):
        for name in ("0000.JPG", "0001.JPG"):
            make_image(root / cat / "Data" / "Images" / "Normal" / name)
        make_image(root / cat / "Data" / "Images" / "Anomaly" / "000.JPG")
        make_mask(root / cat / "Data" / "Masks" / "Anomaly" / "000.png", value=1 if cat == "candle" else 2)
    rows = [
        "object,split,label,image,mask",
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
        "pcb1,test,normal,pcb1/Data/Images/Normal/0001.JPG,",
        "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png",
    ]
    write_visa_csv(root, rows)
    return root


def write_visa_csv(root: Path, rows: list[str]) -> Path:
    path = root / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def btad(tmp_path: Path) -> Path:
    """Category 01: bmp images, png masks; 02: png images, bmp mask, one defective image without mask."""
    root = tmp_path / "btad"
    make_image(root / "01" / "train" / "ok" / "0000.bmp")
    make_image(root / "01" / "train" / "ok" / "0001.bmp")
    make_image(root / "01" / "test" / "ok" / "0002.bmp")
    make_image(root / "01" / "test" / "ko" / "0003.bmp")
    make_mask(root / "01" / "ground_truth" / "ko" / "0003.png")
    make_image(root / "02" / "train" / "ok" / "0000.png")
    make_image(root / "02" / "test" / "ok" / "0001.png")
    make_image(root / "02" / "test" / "ko" / "0002.png")
    make_image(root / "02" / "test" / "ko" / "0003.png")
    make_mask(root / "02" / "ground_truth" / "ko" / "0002.bmp")
    return root


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    """UniAD-style folder: train.json and test.json beside bottle/ and cable/ images."""
    root = tmp_path / "uniad"
    make_image(root / "bottle" / "train" / "good" / "000.png")
    make_image(root / "bottle" / "train" / "good" / "001.png")
    make_image(root / "cable" / "train" / "good" / "000.png")
    make_image(root / "bottle" / "test" / "good" / "000.png")
    make_image(root / "bottle" / "test" / "broken_large" / "000.png")
    make_mask(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    make_image(root / "cable" / "test" / "cut" / "000.png")
    repeated = {"filename": "bottle/train/good/000.png", "label": 0, "label_name": "good", "clsname": "bottle"}
    write_jsonl(
        root / "train.json",
        [
            repeated,
            {"filename": "bottle/train/good/001.png", "label": 0, "label_name": "good"},  # no clsname
            {"filename": "cable/train/good/000.png", "label": 0, "label_name": "good", "clsname": "cable"},
            repeated,
            repeated,
        ],
    )
    write_jsonl(
        root / "test.json",
        [
            {"filename": "bottle/test/good/000.png", "label": 0, "label_name": "good", "maskname": ""},
            {
                "filename": "bottle/test/broken_large/000.png",
                "label": 1,
                "label_name": "defective",
                "maskname": "bottle/ground_truth/broken_large/000_mask.png",
                "clsname": "bottle",
            },
            {"filename": "cable/test/cut/000.png", "label": 1, "label_name": "defective", "clsname": "cable"},
        ],
    )
    return root


# --------------------------------------------------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------------------------------------------------


def test_mvtec_train(mvtec: Path) -> None:
    samples = read_mvtec(mvtec, "train")
    assert names(samples) == ["bottle/good/000.png", "bottle/good/001.png", "bottle/good/002.png", "screw/good/010.JPG"]
    assert all(s.label == 0 and s.mask is None and s.split == "train" for s in samples)
    assert all(s.image.is_absolute() and s.image.is_file() for s in samples)


def test_mvtec_test_labels_defects_and_masks(mvtec: Path) -> None:
    samples = read_mvtec(str(mvtec), "test")
    assert names(samples) == [
        "bottle/broken_large/000.png",
        "bottle/broken_large/001.png",
        "bottle/contamination/000.png",
        "bottle/good/000.png",
        "screw/good/011.JPG",
        "screw/thread/012.JPG",
    ]
    assert [s.label for s in samples] == [1, 1, 1, 0, 0, 1]
    gt = mvtec / "bottle" / "ground_truth" / "broken_large"
    assert samples[0].mask == gt / "000_mask.png"
    assert samples[1].mask == gt / "001_mask.png"
    assert samples[2].mask is None  # defective without mask: not invented
    assert samples[3].mask is None
    assert samples[5].mask == mvtec / "screw" / "ground_truth" / "thread" / "012.png"
    assert {s.split for s in samples} == {"test"}


def test_mvtec_is_deterministic_and_filters_categories(mvtec: Path) -> None:
    assert read_mvtec(mvtec, "test") == read_mvtec(mvtec, "test")
    only = read_mvtec(mvtec, "test", categories=["screw"])
    assert names(only) == ["screw/good/011.JPG", "screw/thread/012.JPG"]
    assert read_mvtec(mvtec, "test", categories=[]) == read_mvtec(mvtec, "test")


@pytest.mark.parametrize("split", ["train", "test"])
def test_mvtec_lists_each_training_folder_once(mvtec: Path, split: str) -> None:
    """Checking that a category has training images and reading them is one listing: its warning comes once."""
    (mvtec / "bottle" / "train" / "good" / "notes.txt").write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = read_mvtec(mvtec, split)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "train/good: 1 files that are not images" in said[0] and said[0].endswith("notes.txt"), said
    assert len(samples) == (4 if split == "train" else 6)


def test_mvtec_unknown_category_lists_available(mvtec: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown category carpet.*available: bottle, screw"):
        read_mvtec(mvtec, "train", categories=["carpet", "bottle"])


def test_mvtec_empty_train_folder(mvtec: Path) -> None:
    (mvtec / "hazelnut" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"hazelnut.train.good is empty"):
        read_mvtec(mvtec, "train")
    assert len(read_mvtec(mvtec, "train", categories=["bottle"])) == 3


def test_mvtec_root_without_categories(tmp_path: Path) -> None:
    (tmp_path / "nothing" / "bottle" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"nothing has no categories"):
        read_mvtec(tmp_path / "nothing", "train")


def test_mvtec_missing_root_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing_root does not exist"):
        read_mvtec(tmp_path / "missing_root", "train")
    with pytest.raises(DatasetError, match=r"split must be"):
        read_mvtec(tmp_path, "val")


# --------------------------------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------------------------------


def test_visa_train_deduplicates(visa: Path) -> None:
    samples = read_visa(visa, "train")
    assert names(samples) == ["candle/good/0000.JPG", "pcb1/good/0000.JPG"]
    assert all(s.label == 0 and s.mask is None for s in samples)


def test_visa_test(visa: Path) -> None:
    samples = read_visa(visa, "test")
    assert names(samples) == [
        "candle/anomaly/000.JPG",
        "candle/good/0001.JPG",
        "pcb1/anomaly/000.JPG",
        "pcb1/good/0001.JPG",
    ]
    assert [s.label for s in samples] == [1, 0, 1, 0]
    assert samples[0].mask == visa / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    assert samples[1].mask is None
    assert samples[0].image == visa / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG"
    assert names(read_visa(visa, "test", ["pcb1"])) == ["pcb1/anomaly/000.JPG", "pcb1/good/0001.JPG"]


def test_visa_missing_image_names_file_and_line(visa: Path) -> None:
    write_visa_csv(
        visa,
        [
            "object,split,label,image,mask",
            "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
            "candle,test,normal,candle/Data/Images/Normal/9999.JPG,",
        ],
    )
    with pytest.raises(DatasetError, match=r"9999\.JPG listed on line 3 of .*1cls\.csv"):
        read_visa(visa, "test")


def test_visa_missing_mask_bad_label_bad_header(visa: Path) -> None:
    header = "object,split,label,image,mask"
    write_visa_csv(visa, [header, "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/x.png"])
    with pytest.raises(DatasetError, match=r"mask .*x\.png listed on line 2"):
        read_visa(visa, "test")
    write_visa_csv(visa, [header, "candle,test,broken,candle/Data/Images/Anomaly/000.JPG,"])
    with pytest.raises(DatasetError, match=r"line 2 of .*1cls\.csv: label must be"):
        read_visa(visa, "test")
    write_visa_csv(visa, ["object,split,image", "candle,test,candle/Data/Images/Anomaly/000.JPG"])
    with pytest.raises(DatasetError, match=r"1cls\.csv lacks the column\(s\) label, mask"):
        read_visa(visa, "test")


def test_visa_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"1cls\.csv does not exist"):
        read_visa(tmp_path, "train")


# --------------------------------------------------------------------------------------------------------------------
# BTAD
# --------------------------------------------------------------------------------------------------------------------


def test_btad_train_and_test(btad: Path) -> None:
    assert names(read_btad(btad, "train")) == ["01/good/0000.bmp", "01/good/0001.bmp", "02/good/0000.png"]
    samples = read_btad(btad, "test")
    assert names(samples) == [
        "01/ko/0003.bmp",
        "01/good/0002.bmp",
        "02/ko/0002.png",
        "02/ko/0003.png",
        "02/good/0001.png",
    ]
    assert [s.label for s in samples] == [1, 0, 1, 1, 0]
    assert samples[0].mask == btad / "01" / "ground_truth" / "ko" / "0003.png"
    assert samples[2].mask == btad / "02" / "ground_truth" / "ko" / "0002.bmp"
    assert samples[3].mask is None
    assert samples[1].mask is None


def test_btad_empty_train(btad: Path) -> None:
    (btad / "03" / "train" / "ok").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"03.train.ok is empty"):
        read_btad(btad, "train")


# --------------------------------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------------------------------


def test_jsonl_train_dedupes_with_one_warning(jsonl: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = read_jsonl(jsonl / "train.json", jsonl, "train")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "dropped 2 duplicate" in messages[0] and "train.json" in messages[0]
    assert names(samples) == ["bottle/good/000.png", "bottle/good/001.png", "cable/good/000.png"]
    assert samples[1].category == "bottle"  # from parts[-4] of the filename
    assert all(s.split == "train" and s.label == 0 and s.mask is None for s in samples)


def test_jsonl_test(jsonl: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = read_jsonl(jsonl / "test.json", jsonl, "test")
    assert names(samples) == ["bottle/broken_large/000.png", "bottle/good/000.png", "cable/cut/000.png"]
    assert [s.label for s in samples] == [1, 0, 1]
    assert samples[0].mask == jsonl / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
    assert samples[2].mask is None
    assert names(read_jsonl(jsonl / "test.json", jsonl, "test", ["cable"])) == ["cable/cut/000.png"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"label": 0}', "has no 'filename'"),
        ('{"filename": "bottle/train/good/000.png", "label": 3}', "'label' must be 0 or 1"),
        ('{"filename": "000.png", "label": 0}', "no 'clsname'"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(jsonl: Path, bad_line: str, message: str) -> None:
    good = {"filename": "bottle/train/good/000.png", "label": 0, "clsname": "bottle"}
    meta = write_jsonl(jsonl / "broken.json", [good, "", bad_line])
    with pytest.raises(DatasetError, match=rf"line 3 of .*broken\.json.*{message}|{message}.*line 3.*broken\.json"):
        read_jsonl(meta, jsonl, "train")


def test_jsonl_missing_image(jsonl: Path) -> None:
    meta = write_jsonl(jsonl / "missing.json", [{"filename": "bottle/train/good/777.png", "label": 0}])
    with pytest.raises(DatasetError, match=r"777\.png listed on line 1 of .*missing\.json does not exist"):
        read_jsonl(meta, jsonl, "train")


# --------------------------------------------------------------------------------------------------------------------
# Format detection, specs and merged roots
# --------------------------------------------------------------------------------------------------------------------


def test_detect_format(mvtec: Path, visa: Path, btad: Path, jsonl: Path, tmp_path: Path) -> None:
    assert [detect_format(p) for p in (mvtec, visa, btad, jsonl)] == ["mvtec", "visa", "btad", "jsonl"]
    (tmp_path / "plain" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"plain.*split_csv/1cls\.csv.*train/ok.*train/good"):
        detect_format(tmp_path / "plain")


def test_read_source_detected_and_prefixed(mvtec: Path, jsonl: Path, visa: Path) -> None:
    assert read_source(str(mvtec), "test") == read_mvtec(mvtec, "test")
    assert read_source(f"mvtec:{mvtec}", "test") == read_mvtec(mvtec, "test")
    assert read_source(f"VISA:{visa}", "train", ["pcb1"]) == read_visa(visa, "train", ["pcb1"])
    assert read_source(f"jsonl:{jsonl}", "test") == read_jsonl(jsonl / "test.json", jsonl, "test")
    with pytest.raises(DatasetError, match=r"has no train\.json or train\.jsonl"):
        read_source(f"jsonl:{mvtec}", "train")


def test_read_source_colon_in_path_is_not_a_format(tmp_path: Path) -> None:
    root = tmp_path / "C:data"
    make_image(root / "bottle" / "train" / "good" / "000.png")
    assert names(read_source(str(root), "train")) == ["bottle/good/000.png"]
    with pytest.raises(DatasetError, match=r"does not exist"):
        read_source("nosuchdrive:\\images", "train")


def test_read_sources_merges(mvtec: Path, visa: Path, btad: Path) -> None:
    samples = read_sources([str(mvtec), f"visa:{visa}", str(btad)], "test")
    counts = Counter(s.category for s in samples)
    assert counts == {"01": 2, "02": 3, "bottle": 4, "candle": 2, "pcb1": 2, "screw": 2}
    assert [s.category for s in samples] == sorted(s.category for s in samples)
    groups = group_by_category(samples)
    assert list(groups) == ["01", "02", "bottle", "candle", "pcb1", "screw"]
    assert names(groups["candle"]) == ["candle/anomaly/000.JPG", "candle/good/0001.JPG"]
    picked = read_sources([str(mvtec), str(visa)], "train", ["screw", "candle"])
    assert names(picked) == ["candle/good/0000.JPG", "screw/good/010.JPG"]
    with pytest.raises(DatasetError, match=r"unknown category cable.*available: bottle, candle, pcb1, screw"):
        read_sources([str(mvtec), str(visa)], "train", ["cable"])


def test_read_sources_category_collision_names_both_roots(mvtec: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_root"
    make_image(other / "bottle" / "train" / "good" / "000.png")
    with pytest.raises(DatasetError, match=r"'bottle'.*mvtec.*other_root"):
        read_sources([str(mvtec), str(other)], "train")


def test_read_sources_empty_and_repeated(mvtec: Path) -> None:
    with pytest.raises(DatasetError, match=r"data\.roots is empty"):
        read_sources([], "train")
    with pytest.raises(DatasetError, match=r"more than once"):
        read_sources([str(mvtec), str(mvtec)], "train")


def test_group_by_category_keeps_order(mvtec: Path) -> None:
    samples = read_mvtec(mvtec, "test")
    groups = group_by_category(list(reversed(samples)))
    assert list(groups) == ["bottle", "screw"]
    assert names(groups["screw"]) == ["screw/thread/012.JPG", "screw/good/011.JPG"]


# --------------------------------------------------------------------------------------------------------------------
# The real benchmark
# --------------------------------------------------------------------------------------------------------------------

# Per-category counts of shared/data/README.md (train good, test good, test defective). Its "Totals" line says
# 503 good / 724 defective, but its own table and the files add up to 363 / 864 (the test total, 1,227, agrees).
IAD_MIX = {
    "bottle": (209, 20, 63),
    "magnetic_tile": (762, 190, 392),
    "kolektorsdd": (266, 67, 50),
    "metal_plate": (54, 26, 71),
    **{f"PA_{c}": (38, 10, 48) for c in ("BDP01_TL", "BRG01_RL", "BTN01_RL", "FLR01_TL", "FVN01_TL", "GLA01_TL")},
}


def test_iad_mix_counts(iad_mix: Path) -> None:
    train = read_mvtec(iad_mix, "train")
    test = read_mvtec(iad_mix, "test")
    assert len(train) == 1519
    assert len(test) == 1227
    assert sum(s.label == 0 for s in test) == 363
    assert sum(s.label == 1 for s in test) == 864
    assert all((s.mask is not None) == (s.label == 1) for s in test)
    assert all(s.mask.is_file() for s in test if s.mask is not None)
    assert len(group_by_category(test)) == 10
    for category, (n_train, n_good, n_bad) in IAD_MIX.items():
        cat_test = [s for s in test if s.category == category]
        assert sum(s.category == category for s in train) == n_train, category
        assert (sum(s.label == 0 for s in cat_test), sum(s.label == 1 for s in cat_test)) == (n_good, n_bad), category
    assert detect_format(iad_mix) == "mvtec"
    assert read_sources([str(iad_mix)], "test") == test


def test_generated_dataset_reads_as_mvtec(gen_data: Path) -> None:
    """The generated dataset of the test session (conftest.gen_data) reads as the real benchmark does: MVTec layout,
    every defective test image with its mask, every good one without."""
    train = read_mvtec(gen_data, "train")
    test = read_mvtec(gen_data, "test")
    assert detect_format(gen_data) == "mvtec"
    assert list(group_by_category(test)) == list(GEN_CATEGORIES)
    assert len(train) == len(GEN_CATEGORIES) * GEN_TRAIN and len(test) == len(GEN_CATEGORIES) * GEN_TEST
    assert sum(s.label == 1 for s in test) == len(GEN_CATEGORIES) * GEN_TEST_DEFECT
    assert all((s.mask is not None) == (s.label == 1) for s in test)
    assert all(s.mask.is_file() for s in test if s.mask is not None)
    assert Counter(s.defect for s in test if s.category == "disc") == {"good": GEN_TEST_GOOD, "scratch": 2, "dent": 2,
                                                                       "missing": 2}
    assert read_sources([str(gen_data)], "test") == test
