"""Reader of the UniAD / OneNIP JSON-lines metadata (``train.json`` / ``test.json``, one object per line)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    image = _absolute(image_dir / entry.filename)
    if not _is_file(image):
        raise DatasetError(_missing_file_message("image", image, f"listed on line {entry.line} of {meta}"))
    if entry.label == 0:
        return Sample(image, entry.category, 0, NORMAL_DEFECT, None, split)
    mask = _absolute(image_dir / entry.maskname) if entry.maskname else None
    if mask is not None and not _is_file(mask):
        raise DatasetError(_missing_file_message("mask", mask, f"listed on line {entry.line} of {meta}"))
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
    _check_split(split)
    meta = _absolute(meta_file)
    if not _is_file(meta):
        raise DatasetError(f"metadata file {meta} does not exist")
    root = _absolute(image_dir)
    _check_folder(root, "image folder")
    entries = _read_jsonl_entries(meta)
    chosen = set(_select_categories((e.category for e in entries), categories, f"metadata file {meta}"))
    seen: dict[Path, tuple[int, Sample]] = {}
    duplicates = 0
    for entry in entries:
        if entry.category in chosen:
            duplicates += _keep_first(seen, _jsonl_sample(entry, root, split, meta), entry.line, meta)
    if duplicates:
        warnings.warn(f"{meta}: dropped {duplicates} duplicate line(s) repeating an image already listed", stacklevel=2)
    return _require_samples(_sort_samples(s for _, s in seen.values()), split, meta)


def _jsonl_meta_file(folder: Path, split: str) -> Path:
    """``<folder>/<split>.json`` or ``.jsonl``; raises if neither exists."""
    for suffix in JSONL_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if _is_file(candidate):
            return candidate
    raise DatasetError(f"JSON-lines folder {folder} has no {split}.json or {split}.jsonl")
