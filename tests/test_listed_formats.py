"""The formats that list their files (VisA csv, JSON lines) are read as the user meant: a defective image listed for
training is not trained on, rows of another split are not dropped silently, and a category with test images but no
training images is an error, as in the folder layouts. Each test fails without the check it names."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip.data import read_source
from onenip.errors import DatasetError, OnenipWarning


def _png(path: Path, value: int = 128) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return path.as_posix()


def visa(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A VisA tree: rows of (object, split, label); each gets its own image (and a mask when defective)."""
    lines = ["object,split,label,image,mask"]
    for i, (obj, split, label) in enumerate(rows):
        image = f"{obj}/Data/Images/{i:03d}.png"
        _png(root / image)
        mask = ""
        if label == "anomaly":
            mask = f"{obj}/Data/Masks/{i:03d}.png"
            _png(root / mask, 255)
        lines.append(f"{obj},{split},{label},{image},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return root


def jsonl(root: Path, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> Path:
    """A JSON-lines tree: (category, label) per listed image of each split."""
    for split, items in (("train", train), ("test", test)):
        lines = []
        for i, (cat, label) in enumerate(items):
            kind = "good" if label == 0 else "bad"
            name = f"{cat}/{split}/{kind}/{i:03d}.png"
            _png(root / name)
            record = {"filename": name, "label": label, "clsname": cat}
            if label:
                record["maskname"] = _png(root / f"{cat}/ground_truth/{kind}/{i:03d}.png", 255).split(f"{root.as_posix()}/")[1]
            lines.append(json.dumps(record))
        (root / f"{split}.json").write_text("\n".join(lines) + "\n")
    return root


def test_visa_defective_rows_in_the_train_split_are_not_trained_on(tmp_path: Path) -> None:
    root = visa(tmp_path / "v", [("pcb", "train", "normal"), ("pcb", "train", "anomaly"), ("pcb", "train", "normal"),
                                 ("pcb", "test", "normal"), ("pcb", "test", "anomaly")])
    with pytest.warns(OnenipWarning, match=r"1 defective images \(label anomaly\) listed in the train split are not "
                                           r"trained on \(the first on line 3\)"):
        train = read_source(str(root), "train")
    assert [s.label for s in train] == [0, 0]


def test_visa_rows_of_another_split_are_named(tmp_path: Path) -> None:
    root = visa(tmp_path / "v", [("pcb", "train", "normal"), ("pcb", "val", "normal"), ("pcb", "Tset", "anomaly"),
                                 ("pcb", "test", "normal")])
    with pytest.warns(OnenipWarning, match=r"2 rows whose split is neither train nor test \(Tset, val; the first on "
                                           r"line 3\) are left out"):
        assert len(read_source(str(root), "train")) == 1


def test_visa_category_without_training_images_is_an_error(tmp_path: Path) -> None:
    root = visa(tmp_path / "v", [("pcb", "train", "normal"), ("pcb", "test", "anomaly"), ("candle", "test", "normal"),
                                 ("candle", "test", "anomaly")])
    with pytest.raises(DatasetError, match="categories candle have test images but no normal training image listed"):
        read_source(str(root), "test")
    assert {s.category for s in read_source(str(root), "test", ["pcb"])} == {"pcb"}  # leaving it out works
    # a labelled set without training images (calibrate --val) is read as it is
    assert {s.category for s in read_source(str(root), "test", labelled_only=True)} == {"pcb", "candle"}


def test_jsonl_defective_training_lines_are_not_trained_on(tmp_path: Path) -> None:
    root = jsonl(tmp_path / "j", train=[("a", 0), ("a", 1), ("a", 0)], test=[("a", 0), ("a", 1)])
    with pytest.warns(OnenipWarning, match=r"1 defective images \(label 1\) listed in the train split are not trained "
                                           r"on \(the first on line 2\)"):
        train = read_source(f"jsonl:{root}", "train")
    assert [s.label for s in train] == [0, 0]


def test_jsonl_category_without_training_images_is_an_error(tmp_path: Path) -> None:
    root = jsonl(tmp_path / "j", train=[("a", 0), ("b", 1)], test=[("a", 1), ("b", 0), ("b", 1)])
    with pytest.raises(DatasetError, match="categories b have test images but no normal training image listed"):
        read_source(f"jsonl:{root}", "test")  # b's only training line is defective: not a training image
    from onenip.data import read_sources

    assert {s.category for s in read_sources([f"jsonl:{root}"], "test", ["a"])} == {"a"}  # leaving b out works


@pytest.mark.parametrize("fmt", ["visa", "jsonl"])
def test_one_warning_counts_the_defective_training_images_of_the_chosen_categories(fmt: str, tmp_path: Path) -> None:
    """Both formats apply the one rule alike: the categories left out are not counted, and it is said once."""
    if fmt == "visa":
        spec = str(visa(tmp_path / "v", [("pcb", "train", "normal"), ("pcb", "train", "anomaly"),
                                         ("candle", "train", "anomaly"), ("candle", "train", "normal"),
                                         ("candle", "train", "anomaly")]))
        want = r"1cls\.csv: 1 defective images \(label anomaly\) listed in the train split are not trained on \(the " \
               r"first on line 3\)"
    else:
        root = jsonl(tmp_path / "j", train=[("pcb", 0), ("candle", 1), ("pcb", 1), ("candle", 1), ("candle", 0)],
                     test=[("pcb", 1)])
        spec, want = f"jsonl:{root}", (r"train\.json: 1 defective images \(label 1\) listed in the train split are not "
                                       r"trained on \(the first on line 3\)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = read_source(spec, "train", ["pcb"])
    said = [str(w.message) for w in caught if "not trained on" in str(w.message)]
    assert len(said) == 1 and re.search(want, said[0]), said
    assert [(s.category, s.label) for s in train] == [("pcb", 0)]


def test_files_that_are_not_images_are_named_not_dropped_silently(tmp_path: Path) -> None:
    from onenip.deploy.predictor import expand_inputs

    good = tmp_path / "m" / "part" / "train" / "good"
    for name in ("000.png", "001.png"):
        _png(good / name)
    (good / "002.webp").write_bytes(b"RIFF")
    (good / "notes.txt").write_text("x")
    (good / ".DS_Store").write_bytes(b"")  # hidden files are not named
    _png(tmp_path / "m" / "part" / "test" / "good" / "000.png")
    with pytest.warns(OnenipWarning, match=r"train/good: 2 files that are not images of a supported type .* are left "
                                           r"out: 002.webp, notes.txt$"):
        assert len(read_source(str(tmp_path / "m"), "train")) == 2
    with pytest.warns(OnenipWarning, match=r"folder .*good: 2 files that are not images .* left out: 002.webp, notes.txt"):
        assert [p.name for p in expand_inputs([str(good)])] == ["000.png", "001.png"]
