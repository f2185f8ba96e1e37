"""Reader of VisA, as listed by ``<root>/split_csv/1cls.csv``."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DatasetError
from .files import (
    NORMAL_DEFECT,
    Sample,
    _absolute,
    _check_folder,
    _check_split,
    _is_file,
    _keep_first,
    _missing_file_message,
    _require_samples,
    _select_categories,
    _sort_samples,
)

VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _visa_file(root: Path, value: str, csv_path: Path, line: int, what: str) -> Path:
    """`value` (relative to `root`) as an absolute path; raises if the file does not exist."""
    path = _absolute(root / value)
    if not _is_file(path):
        raise DatasetError(_missing_file_message(what, path, f"listed on line {line} of {csv_path}"))
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
    _check_split(split)
    root_path = _absolute(root)
    _check_folder(root_path, "VisA root")
    csv_path = root_path / VISA_CSV
    if not _is_file(csv_path):
        raise DatasetError(f"VisA split file {csv_path} does not exist")
    rows = [(line, row) for line, row in _read_visa_rows(csv_path) if (row.get("split") or "").strip().lower() == split]
    available = {_visa_category(row, csv_path, line) for line, row in rows}
    chosen = set(_select_categories(available, categories, f"VisA split file {csv_path} ({split} split)"))
    seen: dict[Path, tuple[int, Sample]] = {}
    for line, row in rows:
        if _visa_category(row, csv_path, line) not in chosen:
            continue
        sample = _visa_row(row, root_path, csv_path, line)
        _keep_first(seen, sample, line, csv_path)
    return _require_samples(_sort_samples(s for _, s in seen.values()), split, csv_path)
