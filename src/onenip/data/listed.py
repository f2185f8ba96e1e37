"""Readers of the formats that list their files in a metadata file: VisA and the UniAD / OneNIP JSON lines.

* VisA: ``<root>/split_csv/1cls.csv``, one row per image (category, split, label, image and mask paths);
* JSON lines: ``train.json`` / ``test.json``, one object per line (the UniAD / OneNIP metadata).

A listed file that is missing is an error naming the metadata file and line; an image listed twice counts once; a
defective image listed in the train split is not trained on (one warning counts them).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from onenip.data.files import (
    NORMAL_DEFECT,
    SPLITS,
    Sample,
    absolute,
    check_folder,
    check_split,
    is_file,
    keep_first,
    missing_file_message,
    require_samples,
    select_categories,
    sort_samples,
)
from onenip.errors import DatasetError, OnenipWarning

_Listed = TypeVar("_Listed")


def _trainable(listed: list[_Listed], split: str, defective: Callable[[_Listed], bool], line: Callable[[_Listed], int],
               source: Path, label: str) -> list[_Listed]:
    """`listed` (the entries of the chosen categories, in file order) without the defective images when `split` is
    train: a defective image listed for training is never trained on as a normal one. One warning counts them and names
    the line of the first (`label`: how the format marks them)."""
    if split != "train":
        return listed
    dropped = [line(entry) for entry in listed if defective(entry)]
    if dropped:
        warnings.warn(f"{source}: {len(dropped)} defective images ({label}) listed in the train split are not trained "
                      f"on (the first on line {dropped[0]})", OnenipWarning, stacklevel=3)
    return [entry for entry in listed if not defective(entry)]


# --------------------------------------------------------------------------------------------------------------------
# VisA (split_csv/1cls.csv)
# --------------------------------------------------------------------------------------------------------------------


VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _visa_file(root: Path, value: str, csv_path: Path, line: int, what: str) -> Path:
    """`value` (relative to `root`) as an absolute path; raises if the file does not exist."""
    path = absolute(root / value)
    if not is_file(path):
        raise DatasetError(missing_file_message(what, path, f"listed on line {line} of {csv_path}"))
    return path


def _visa_category(row: dict[str, str], csv_path: Path, line: int) -> str:
    category = (row.get("object") or "").strip()
    if not category:
        raise DatasetError(f"line {line} of {csv_path}: the object (category) column is empty")
    return category


def _visa_row(row: dict[str, str], root: Path, csv_path: Path, line: int) -> Sample:
    """The sample described by one csv row (already known to be of the wanted split and category)."""
    label_text = (row.get("label") or "").strip().lower()
    if label_text not in ("normal", "anomaly"):
        raise DatasetError(f"line {line} of {csv_path}: label must be 'normal' or 'anomaly', got {row.get('label')!r}")
    image_value = (row.get("image") or "").strip()
    if not image_value:
        raise DatasetError(f"line {line} of {csv_path}: the image column is empty")
    image = _visa_file(root, image_value, csv_path, line, "image")
    category = _visa_category(row, csv_path, line)
    split = (row.get("split") or "").strip().lower()
    if label_text == "normal":
        return Sample(image, category, 0, NORMAL_DEFECT, None, split)
    mask_value = (row.get("mask") or "").strip()
    mask = _visa_file(root, mask_value, csv_path, line, "mask") if mask_value else None
    return Sample(image, category, 1, "anomaly", mask, split)


def _read_visa_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of the VisA csv with their line numbers; checks the header."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(
                    f"{csv_path} lacks the column(s) {', '.join(missing)}; expected the header {','.join(VISA_COLUMNS)}"
                )
            return [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read VisA split file {csv_path}: {exc}") from exc


def read_visa(root: str | os.PathLike[str], split: str, categories: Sequence[str] | None = None) -> list[Sample]:
    """Samples of a VisA folder, as listed by ``<root>/split_csv/1cls.csv``.

    The csv has the header ``object,split,label,image,mask``; label is ``normal`` or ``anomaly``; image and mask
    are relative to `root` (mask empty for normal images). Defect types are ``"good"`` and ``"anomaly"``. An
    image listed twice in the same split counts once.

    Raises:
        DatasetError: missing root or csv, a bad header or label, a missing image or mask file (naming it and
            the csv line), an image listed twice with different contents, or no image in the split.
    """
    check_split(split)
    root_path = absolute(root)
    check_folder(root_path, "VisA root")
    csv_path = root_path / VISA_CSV
    if not is_file(csv_path):
        raise DatasetError(f"VisA split file {csv_path} does not exist")
    all_rows = _read_visa_rows(csv_path)
    other = [(line, (row.get("split") or "").strip()) for line, row in all_rows
             if (row.get("split") or "").strip().lower() not in SPLITS]
    if other:
        values = sorted({value or "(empty)" for _, value in other})
        warnings.warn(f"{csv_path}: {len(other)} rows whose split is neither train nor test ({', '.join(values[:5])}; "
                      f"the first on line {other[0][0]}) are left out", OnenipWarning, stacklevel=2)
    rows = [(line, row) for line, row in all_rows if (row.get("split") or "").strip().lower() == split]
    available = {_visa_category(row, csv_path, line) for line, row in rows}
    chosen = set(select_categories(available, categories, f"VisA split file {csv_path} ({split} split)"))
    rows = [(line, row) for line, row in rows if _visa_category(row, csv_path, line) in chosen]
    rows = _trainable(rows, split, lambda r: (r[1].get("label") or "").strip().lower() == "anomaly", lambda r: r[0],
                      csv_path, "label anomaly")
    seen: dict[Path, tuple[int, Sample]] = {}
    for line, row in rows:
        keep_first(seen, _visa_row(row, root_path, csv_path, line), line, csv_path)
    return require_samples(sort_samples(s for _, s in seen.values()), split, csv_path)


# --------------------------------------------------------------------------------------------------------------------
# UniAD / OneNIP JSON-lines metadata
# --------------------------------------------------------------------------------------------------------------------


JSONL_SUFFIXES = (".json", ".jsonl")


def _jsonl_field(record: dict[str, Any], key: str, meta: Path, line: int) -> str:
    """A string field of a metadata record; empty string when absent or null."""
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"line {line} of {meta}: '{key}' must be a string, got {value!r}")
    return value.strip()


def _jsonl_label(record: dict[str, Any], meta: Path, line: int) -> int:
    value = record.get("label")
    if isinstance(value, bool) or value not in (0, 1):
        raise DatasetError(f"line {line} of {meta}: 'label' must be 0 or 1, got {value!r}")
    return int(value)


def _jsonl_category(record: dict[str, Any], filename: str, meta: Path, line: int) -> str:
    """``clsname`` if given, else the fourth path component from the end of ``filename``."""
    category = _jsonl_field(record, "clsname", meta, line)
    if category:
        return category
    parts = Path(filename).parts
    if len(parts) < 4:
        raise DatasetError(
            f"line {line} of {meta}: no 'clsname' and the filename {filename!r} is too short to hold the category "
            "(expected <category>/<split>/<type>/<file>)"
        )
    return parts[-4]


def _parse_jsonl_line(text: str, meta: Path, line: int) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"line {line} of {meta} is not valid JSON: {exc.msg}") from exc
    if not isinstance(record, dict):
        raise DatasetError(f"line {line} of {meta} is not a JSON object")
    return record


@dataclass(frozen=True)
class _JsonlEntry:
    """The checked fields of one metadata line."""

    line: int
    filename: str
    label: int
    category: str
    maskname: str


def _jsonl_entry(record: dict[str, Any], meta: Path, line: int) -> _JsonlEntry:
    """The fields of one metadata record, checked (files are not looked at)."""
    filename = _jsonl_field(record, "filename", meta, line)
    if not filename:
        raise DatasetError(f"line {line} of {meta} has no 'filename'")
    label = _jsonl_label(record, meta, line)
    category = _jsonl_category(record, filename, meta, line)
    return _JsonlEntry(line, filename, label, category, _jsonl_field(record, "maskname", meta, line))


def _jsonl_sample(entry: _JsonlEntry, image_dir: Path, split: str, meta: Path) -> Sample:
    """The sample of one metadata entry; checks its image (and mask) exist."""
    image = absolute(image_dir / entry.filename)
    if not is_file(image):
        raise DatasetError(missing_file_message("image", image, f"listed on line {entry.line} of {meta}"))
    if entry.label == 0:
        return Sample(image, entry.category, 0, NORMAL_DEFECT, None, split)
    mask = absolute(image_dir / entry.maskname) if entry.maskname else None
    if mask is not None and not is_file(mask):
        raise DatasetError(missing_file_message("mask", mask, f"listed on line {entry.line} of {meta}"))
    return Sample(image, entry.category, 1, image.parent.name, mask, split)


def _read_jsonl_entries(meta: Path) -> list[_JsonlEntry]:
    """The non-blank lines of `meta`, parsed and checked, with their 1-based line numbers."""
    try:
        lines = meta.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read metadata file {meta}: {exc}") from exc
    return [
        _jsonl_entry(_parse_jsonl_line(text, meta, n), meta, n) for n, text in enumerate(lines, start=1) if text.strip()
    ]


def read_jsonl(
    meta_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    split: str,
    categories: Sequence[str] | None = None,
) -> list[Sample]:
    """Samples listed by a UniAD/OneNIP JSON-lines metadata file.

    Each line is an object with ``filename`` (relative to `image_dir`), ``label`` (0/1), ``maskname`` (absent or
    empty for normal images) and ``clsname`` (default: ``Path(filename).parts[-4]``). Defective images get the
    name of their parent folder as defect type. Lines repeating a filename are dropped, with one warning.

    Raises:
        DatasetError: a missing file, a bad line (naming the file and line number), a missing image or mask, a
            repeated filename with different contents, an unknown requested category, or no samples.
    """
    check_split(split)
    meta = absolute(meta_file)
    if not is_file(meta):
        raise DatasetError(f"metadata file {meta} does not exist")
    root = absolute(image_dir)
    check_folder(root, "image folder")
    entries = _read_jsonl_entries(meta)
    chosen = set(select_categories((e.category for e in entries), categories, f"metadata file {meta}"))
    entries = _trainable([e for e in entries if e.category in chosen], split, lambda e: e.label == 1, lambda e: e.line,
                         meta, "label 1")
    seen: dict[Path, tuple[int, Sample]] = {}
    duplicates = 0
    for entry in entries:
        duplicates += keep_first(seen, _jsonl_sample(entry, root, split, meta), entry.line, meta)
    if duplicates:
        warnings.warn(f"{meta}: dropped {duplicates} duplicate line(s) repeating an image already listed", OnenipWarning, stacklevel=2)
    return require_samples(sort_samples(s for _, s in seen.values()), split, meta)


def jsonl_meta_file(folder: Path, split: str) -> Path:
    """``<folder>/<split>.json`` or ``.jsonl``; raises if neither exists."""
    for suffix in JSONL_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if is_file(candidate):
            return candidate
    raise DatasetError(f"JSON-lines folder {folder} has no {split}.json or {split}.jsonl")
