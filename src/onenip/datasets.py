"""Discovering the samples of anomaly-detection datasets.

Four layouts are understood, each turned into a flat, sorted list of :class:`Sample`:

* ``mvtec``: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/<type>/*`` (``good`` is normal) and masks
  ``<root>/<category>/ground_truth/<type>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``);
* ``visa``: ``<root>/split_csv/1cls.csv`` listing every image and mask relative to the root;
* ``btad``: ``<root>/<category>/train/ok``, ``test/ok``, ``test/ko`` and masks ``ground_truth/ko/<stem>.<ext>``;
* ``jsonl``: the UniAD/OneNIP JSON-lines metadata (``train.json`` / ``test.json``), one object per line.

:func:`read_source` reads one ``[FORMAT:]PATH`` spec, :func:`read_sources` merges several into one unified set.
The readers look at file names only; :func:`validate_samples` then decodes every image and mask (with
:mod:`onenip.images`) and reports, or with ``skip_bad`` skips, the unusable ones.

Folders assembled by hand: a folder that cannot be listed, a file where a folder is expected and a category without
training images are DatasetErrors naming them; file names may hold any characters the file system allows (non-ASCII,
spaces, even bytes that are not UTF-8); a symbolic link to a missing file is listed like an image and reported by
:func:`validate_samples` as a broken link; a folder named like an image (``x.png``) is not an image and is ignored.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DatasetError

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Sample",
    "detect_format",
    "group_by_category",
    "read_btad",
    "read_jsonl",
    "read_mvtec",
    "read_source",
    "read_sources",
    "read_visa",
    "validate_samples",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""Lower-case suffixes of the files taken as images (compared case-insensitively)."""

SPLITS: tuple[str, ...] = ("train", "test")
FORMATS: tuple[str, ...] = ("mvtec", "visa", "btad", "jsonl")

MAX_LISTED_PROBLEMS = 10
"""Most bad files (or categories) named one by one in an error or warning; the rest are counted."""

NORMAL_DEFECT = "good"
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
JSONL_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its ground truth."""

    image: Path
    """Absolute path of the image file."""
    category: str
    """Product category, e.g. ``"bottle"``."""
    label: int
    """0 for a normal image, 1 for a defective one."""
    defect: str
    """Defect type; ``"good"`` for normal images."""
    mask: Path | None
    """Ground-truth mask file; None for normal images and for defective images that have no mask."""
    split: str
    """``"train"`` or ``"test"``."""


# --------------------------------------------------------------------------------------------------------------------
# Small helpers shared by the readers
# --------------------------------------------------------------------------------------------------------------------


def _absolute(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute and normalised, with ``~`` expanded, without resolving symbolic links."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


_NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
"""errno values meaning "there is no such file or folder" (a missing path, a file used as a folder, a link loop)."""


def _os_reason(exc: OSError) -> str:
    """A short reason for an OSError, without the path (which the caller's message names)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc) or type(exc).__name__


def _path_kind(path: Path) -> str:
    """``"folder"``, ``"file"``, ``"missing"`` (including broken links) or ``"other"`` (a device, a pipe...).

    Raises:
        DatasetError: `path` cannot be examined (e.g. its parent folder is not readable), naming it.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in _NOT_THERE:
            return "missing"
        raise DatasetError(f"cannot examine {path}: {_os_reason(exc)}") from exc
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _is_folder(path: Path) -> bool:
    """True for an existing folder (or a link to one); raises DatasetError when `path` cannot be examined."""
    return _path_kind(path) == "folder"


def _is_file(path: Path) -> bool:
    """True for an existing regular file (or a link to one); raises DatasetError when `path` cannot be examined."""
    return _path_kind(path) == "file"


def _missing_file_message(what: str, path: Path, where: str) -> str:
    """``<what> <path> <where> does not exist``, or says it is a broken link or not a file."""
    if os.path.islink(path) and _path_kind(path) == "missing":
        return f"{what} {path} {where} is a broken symbolic link (its target {os.readlink(path)} does not exist)"
    if _path_kind(path) != "missing":
        return f"{what} {path} {where} is not a file"
    return f"{what} {path} {where} does not exist"


def _file_in_the_way(folder: Path, top: Path) -> Path | None:
    """The first of `folder` and its parents below `top` that exists but is not a folder (a file named like a
    folder), or None."""
    current = folder
    while current != top and top in current.parents:
        if _path_kind(current) not in ("folder", "missing"):
            return current
        current = current.parent
    return None


def _check_folder(root: Path, what: str) -> None:
    """Raise unless `root` is an existing folder."""
    kind = _path_kind(root)
    if kind == "missing":
        raise DatasetError(f"{what} {root} does not exist")
    if kind != "folder":
        raise DatasetError(f"{what} {root} is not a folder")


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of `folder` sorted by name; empty if the folder does not exist or is a file.

    Raises:
        DatasetError: the folder exists but cannot be listed (permissions...), naming it.
    """
    try:
        with os.scandir(folder) as scan:
            return sorted(scan, key=lambda entry: entry.name)
    except OSError as exc:
        if exc.errno in _NOT_THERE:
            return []
        raise DatasetError(f"cannot list folder {folder}: {_os_reason(exc)}") from exc


def _is_image_entry(entry: os.DirEntry[str]) -> bool:
    """True for a visible entry with an image suffix that is a file, a broken link, or cannot be examined.

    Broken links and entries that cannot be examined are kept so that :func:`validate_samples` reports them, named,
    instead of them silently vanishing; folders (``x.png/``), pipes and devices are not images.
    """
    if Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS or entry.name.startswith("."):
        return False
    try:
        return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:
        return True


def _list_images(folder: Path) -> list[Path]:
    """The image files directly inside `folder` (see :func:`_is_image_entry`), sorted by name.

    Empty if the folder does not exist; raises DatasetError if it cannot be listed.
    """
    return [Path(entry.path) for entry in _entries(folder) if _is_image_entry(entry)]


def _entry_is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _list_subfolders(folder: Path) -> list[Path]:
    """The visible subfolders of `folder`, sorted by name; empty if the folder does not exist."""
    return [Path(e.path) for e in _entries(folder) if not e.name.startswith(".") and _entry_is_folder(e)]


def _index_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of `folder` keyed by stem; when two share a stem, the first in name order wins."""
    index: dict[str, Path] = {}
    for path in _list_images(folder):
        index.setdefault(path.stem, path)
    return index


def _find_mask(index: dict[str, Path], stem: str, candidates: Sequence[str]) -> Path | None:
    """The first mask of `index` named by one of `candidates` (format strings over ``stem``), or None."""
    for pattern in candidates:
        found = index.get(pattern.format(stem=stem))
        if found is not None:
            return found
    return None


def _sort_samples(samples: Iterable[Sample]) -> list[Sample]:
    """Samples in a deterministic order: by category, then image path."""
    return sorted(samples, key=lambda s: (s.category, s.image.as_posix()))


def _select_categories(available: Iterable[str], categories: Sequence[str] | None, where: str) -> list[str]:
    """The requested categories (all of `available` when `categories` is None or empty), sorted.

    Raises DatasetError naming `where` and listing the available categories when one is unknown.
    """
    known = sorted(set(available))
    if not categories:
        return known
    if isinstance(categories, str):
        categories = [categories]
    unknown = sorted(set(categories) - set(known))
    if unknown:
        raise DatasetError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {where}; "
            f"available: {', '.join(known) if known else '(none)'}"
        )
    return sorted(set(categories))


def _require_samples(samples: list[Sample], split: str, where: Path) -> list[Sample]:
    if not samples:
        raise DatasetError(f"no {split} images found in {where}")
    return samples


# --------------------------------------------------------------------------------------------------------------------
# Folder layouts: MVTec AD and BTAD
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FolderLayout:
    """The names that distinguish a folder-per-category layout (MVTec AD, BTAD)."""

    name: str
    normal_folder: str
    """Folder of normal images under ``train/`` and ``test/``."""
    defect_folders: tuple[str, ...] | None
    """Defective-image folders under ``test/``; None means every folder other than `normal_folder`."""
    defect_name: str | None
    """Defect type given to every defective image; None means the folder name."""
    mask_names: tuple[str, ...]
    """Mask file stems tried in ``ground_truth/<folder>/``, as format strings over the image ``stem``."""


_MVTEC = _FolderLayout("MVTec AD", "good", None, None, ("{stem}_mask", "{stem}"))
_BTAD = _FolderLayout("BTAD", "ok", ("ko",), "ko", ("{stem}", "{stem}_mask"))


def _folder_categories(root: Path, split: str) -> tuple[list[str], dict[str, str]]:
    """The categories of a folder layout: (names, {name: reason} of the subfolders that cannot be looked into).

    For the train split a category is a subfolder holding ``train/`` or ``test/`` (so a category with test images
    but no training images is found, and reported); for the test split, one holding ``test/``.
    """
    markers = ("train", "test") if split == "train" else ("test",)
    names: list[str] = []
    unreadable: dict[str, str] = {}
    for folder in _list_subfolders(root):
        try:
            if any(_is_folder(folder / marker) for marker in markers):
                names.append(folder.name)
        except DatasetError as exc:
            reason = _os_reason(exc.__cause__) if isinstance(exc.__cause__, OSError) else str(exc)
            unreadable[folder.name] = f"category folder {folder} cannot be read: {reason}"
    return names, unreadable


def _train_images(cat_dir: Path, layout: _FolderLayout) -> list[Path]:
    """The training images of a category; raises DatasetError naming the category when there are none."""
    folder = cat_dir / "train" / layout.normal_folder
    try:
        images = _list_images(folder)
        kind = _path_kind(folder)
        in_the_way = _file_in_the_way(folder, cat_dir)
    except DatasetError as exc:
        raise DatasetError(f"{layout.name} category {cat_dir.name} cannot be read: {exc}") from exc
    if images:
        return images
    if kind == "folder":
        state = "is empty (no png/jpg/jpeg/bmp/tif/tiff images)"
    elif in_the_way is not None:
        state = f"is not a folder ({in_the_way} is a file)"
    else:
        state = "does not exist"
    raise DatasetError(
        f"{layout.name} category {cat_dir.name} has no training images: training folder {folder} {state}; "
        "a model cannot get normal image prompts for it"
    )


def _folder_train(cat_dir: Path, layout: _FolderLayout) -> list[Sample]:
    return [Sample(p, cat_dir.name, 0, NORMAL_DEFECT, None, "train") for p in _train_images(cat_dir, layout)]


def _folder_test_type(cat_dir: Path, folder_name: str, layout: _FolderLayout) -> list[Sample]:
    """Samples of one ``test/<folder_name>`` folder, defective images paired with their masks."""
    images = _list_images(cat_dir / "test" / folder_name)
    if folder_name == layout.normal_folder:
        return [Sample(p, cat_dir.name, 0, NORMAL_DEFECT, None, "test") for p in images]
    mask_folder = cat_dir / "ground_truth" / folder_name
    in_the_way = _file_in_the_way(mask_folder, cat_dir)
    if in_the_way is not None:
        raise DatasetError(f"{layout.name} mask folder {mask_folder} is not a folder ({in_the_way} is a file)")
    masks = _index_by_stem(mask_folder)
    defect = layout.defect_name or folder_name
    return [
        Sample(p, cat_dir.name, 1, defect, _find_mask(masks, p.stem, layout.mask_names), "test") for p in images
    ]


def _folder_test(cat_dir: Path, layout: _FolderLayout) -> list[Sample]:
    test_dir = cat_dir / "test"
    if layout.defect_folders is None:
        folders = [p.name for p in _list_subfolders(test_dir)]
    else:
        folders = [layout.normal_folder, *layout.defect_folders]
    samples = [s for name in folders for s in _folder_test_type(cat_dir, name, layout)]
    if not samples:
        raise DatasetError(f"{layout.name} test folder {test_dir} holds no images (looked in {', '.join(folders)})")
    return samples


def _listing(items: Sequence[str]) -> str:
    """Up to :data:`MAX_LISTED_PROBLEMS` items, one per indented line, then how many more there are."""
    lines = [f"\n  - {item}" for item in items[:MAX_LISTED_PROBLEMS]]
    if len(items) > MAX_LISTED_PROBLEMS:
        lines.append(f"\n  ... and {len(items) - MAX_LISTED_PROBLEMS} more")
    return "".join(lines)


def _usable_categories(
    root: Path, chosen: list[str], unreadable: dict[str, str], layout: _FolderLayout, skip_bad: bool
) -> list[str]:
    """The chosen categories that have training images. The others raise one DatasetError listing them all, or with
    `skip_bad` are dropped with one warning (an error still when none is left)."""
    problems: dict[str, str] = {}
    for cat in chosen:
        if cat in unreadable:
            problems[cat] = unreadable[cat]
            continue
        try:
            _train_images(root / cat, layout)
        except DatasetError as exc:
            problems[cat] = str(exc)
    if not problems:
        return chosen
    usable = [cat for cat in chosen if cat not in problems]
    listed = _listing(list(problems.values()))
    count = f"{len(problems)} of {len(chosen)} categor{'y' if len(chosen) == 1 else 'ies'}"
    if not skip_bad or not usable:
        hint = "" if skip_bad else "; set data.skip_bad=true to leave them out (with a warning),"
        raise DatasetError(
            f"{count} of {layout.name} root {root} cannot be used:{listed}\n"
            f"add training images{hint} or choose categories with data.categories"
        )
    warnings.warn(f"data.skip_bad: left out {count} of {layout.name} root {root}:{listed}", stacklevel=4)
    return usable


def _read_folder_layout(
    root: str | os.PathLike[str],
    split: str,
    categories: Sequence[str] | None,
    layout: _FolderLayout,
    skip_bad: bool = False,
) -> list[Sample]:
    _check_split(split)
    root_path = _absolute(root)
    _check_folder(root_path, f"{layout.name} root")
    available, unreadable = _folder_categories(root_path, split)
    if not available and not unreadable:
        raise DatasetError(
            f"{layout.name} root {root_path} has no categories: no subfolder holds a '{split}' folder"
        )
    if categories:
        requested = {categories} if isinstance(categories, str) else set(categories)
        unreadable = {name: reason for name, reason in unreadable.items() if name in requested}
    chosen = _select_categories([*available, *unreadable], categories, f"{layout.name} root {root_path}")
    chosen = _usable_categories(root_path, chosen, unreadable, layout, skip_bad)
    read = _folder_train if split == "train" else _folder_test
    return _sort_samples(s for cat in chosen for s in read(root_path / cat, layout))


def read_mvtec(
    root: str | os.PathLike[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False
) -> list[Sample]:
    """Samples of an MVTec AD style folder (any number of categories).

    A category is a subfolder of `root` holding ``train/`` or ``test/`` (only ``test/`` counts for the test
    split). Test images of ``test/good`` are normal; the others are defective with defect type = folder name and the
    mask ``ground_truth/<type>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``) when present, else None.

    Every category read, for either split, must have at least one training image in ``train/good`` (one is enough:
    it is its own prompt): a model cannot get normal-image prompts for a category without. Such a category, or a
    category folder that cannot be read, is an error naming it; with `skip_bad` it is left out with one warning
    (still an error when no category is left). Images are not decoded here: see :func:`validate_samples`.

    Raises:
        DatasetError: missing root, no categories, an unknown requested category, a category without training
            images, a folder that cannot be listed, or a test folder without images.
    """
    return _read_folder_layout(root, split, categories, _MVTEC, skip_bad)


def read_btad(
    root: str | os.PathLike[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False
) -> list[Sample]:
    """Samples of a BTAD style folder: ``train/ok``, ``test/ok`` (normal) and ``test/ko`` (defective).

    Defective images get defect type ``"ko"`` and the mask ``ground_truth/ko/<stem>.<ext>`` when present.
    Categories without training images are handled as by :func:`read_mvtec`.

    Raises:
        DatasetError: as :func:`read_mvtec`.
    """
    return _read_folder_layout(root, split, categories, _BTAD, skip_bad)


# --------------------------------------------------------------------------------------------------------------------
# VisA (split_csv/1cls.csv)
# --------------------------------------------------------------------------------------------------------------------


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


def _keep_first(seen: dict[Path, tuple[int, Sample]], sample: Sample, line: int, source: Path) -> bool:
    """Record `sample` unless its image is already in `seen`; returns True if it was a duplicate.

    Raises DatasetError when a duplicate disagrees with the first listing.
    """
    first = seen.get(sample.image)
    if first is None:
        seen[sample.image] = (line, sample)
        return False
    first_line, first_sample = first
    if first_sample != sample:
        raise DatasetError(
            f"{source} lists image {sample.image} twice with different labels, masks or categories "
            f"(lines {first_line} and {line})"
        )
    return True


# --------------------------------------------------------------------------------------------------------------------
# UniAD / OneNIP JSON-lines metadata
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Format detection and several roots
# --------------------------------------------------------------------------------------------------------------------


def _has_subfolder_with(root: Path, relative: str) -> bool:
    """True if a subfolder of `root` holds the folder `relative`; subfolders that cannot be examined do not."""
    for folder in _list_subfolders(root):
        try:
            if _is_folder(folder / relative):
                return True
        except DatasetError:
            continue
    return False


def detect_format(root: str | os.PathLike[str]) -> str:
    """The layout of the dataset folder `root`: ``"visa"``, ``"jsonl"``, ``"btad"`` or ``"mvtec"``.

    Checked in that order: ``split_csv/1cls.csv``; ``train``/``test`` ``.json``/``.jsonl`` files; a subfolder with
    ``train/ok``; a subfolder with ``train/good``.

    Raises:
        DatasetError: `root` is missing or matches no layout.
    """
    path = _absolute(root)
    _check_folder(path, "dataset root")
    if _is_file(path / VISA_CSV):
        return "visa"
    if any(_is_file(path / f"{split}{suffix}") for split in SPLITS for suffix in JSONL_SUFFIXES):
        return "jsonl"
    if _has_subfolder_with(path, "train/ok"):
        return "btad"
    if _has_subfolder_with(path, "train/good"):
        return "mvtec"
    raise DatasetError(
        f"cannot tell the dataset format of {path}: looked for split_csv/1cls.csv (visa), train.json/test.json or "
        ".jsonl (jsonl), <category>/train/ok (btad) and <category>/train/good (mvtec); "
        "prefix the path with FORMAT: to choose one"
    )


def _parse_spec(spec: str) -> tuple[str | None, str]:
    """``FORMAT:PATH`` split into (format, path); (None, spec) when the prefix is not a known format."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.strip().lower() in FORMATS:
        return prefix.strip().lower(), rest
    return None, spec


def read_source(
    spec: str, split: str, categories: Sequence[str] | None = None, skip_bad: bool = False
) -> list[Sample]:
    """Samples of one dataset root given as ``PATH`` (format detected) or ``FORMAT:PATH``.

    FORMAT is one of mvtec, visa, btad, jsonl; any other prefix is part of the path (so ``C:\\data`` works). For
    jsonl, PATH is a folder holding ``<split>.json`` (or ``.jsonl``) whose image paths are relative to it.
    `skip_bad` leaves out the categories without training images of the folder layouts (mvtec, btad), with a
    warning; visa and jsonl list their files explicitly and a listed file that is missing stays an error.

    Raises:
        DatasetError: an empty or missing path, or any error of the format's reader.
    """
    _check_split(split)
    fmt, path_text = _parse_spec(spec)
    if not path_text.strip():
        raise DatasetError(f"dataset root {spec!r} has an empty path")
    root = _absolute(path_text)
    _check_folder(root, "dataset root")
    fmt = fmt or detect_format(root)
    if fmt == "jsonl":
        return read_jsonl(_jsonl_meta_file(root, split), root, split, categories)
    if fmt == "mvtec":
        return read_mvtec(root, split, categories, skip_bad)
    if fmt == "btad":
        return read_btad(root, split, categories, skip_bad)
    return read_visa(root, split, categories)


def _check_collisions(per_source: list[tuple[str, list[Sample]]]) -> None:
    """Raise if two sources hold the same category name."""
    owner: dict[str, str] = {}
    for spec, samples in per_source:
        for category in sorted({s.category for s in samples}):
            other = owner.setdefault(category, spec)
            if other != spec:
                raise DatasetError(
                    f"category {category!r} is found in both {other} and {spec}; a unified set needs distinct "
                    "category names: train these roots separately, rename one category folder, or select "
                    "categories with data.categories"
                )


def read_sources(
    specs: Sequence[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False
) -> list[Sample]:
    """Samples of several dataset roots merged into one unified set (one model for several datasets).

    Each spec is read by :func:`read_source` (with `skip_bad`); `categories` (None or empty: all) filters across
    all sources. Images are not decoded: pass the result to :func:`validate_samples` for that.

    Raises:
        DatasetError: no specs, the same root listed twice, two roots sharing a category name, an unknown
            requested category (listing those of every source), or any error of a reader.
    """
    _check_split(split)
    if not specs:
        raise DatasetError("data.roots is empty: give at least one dataset root")
    repeated = sorted({s for s in specs if list(specs).count(s) > 1})
    if repeated:
        raise DatasetError(f"data.roots lists {', '.join(repeated)} more than once")
    per_source = [(spec, read_source(spec, split, skip_bad=skip_bad)) for spec in specs]
    available = {s.category for _, samples in per_source for s in samples}
    chosen = set(_select_categories(available, categories, f"data.roots ({', '.join(specs)})"))
    per_source = [(spec, [s for s in samples if s.category in chosen]) for spec, samples in per_source]
    _check_collisions(per_source)
    return _sort_samples(s for _, samples in per_source for s in samples)


# --------------------------------------------------------------------------------------------------------------------
# Decoding every file
# --------------------------------------------------------------------------------------------------------------------


def _sample_problem(sample: Sample) -> str | None:
    """Why `sample` cannot be used (its image, or its mask, cannot be decoded or do not match), or None."""
    from .images import load_image, load_mask  # images imports this module: import here, not at the top

    try:
        size = load_image(sample.image).size
        if sample.mask is not None:
            load_mask(sample.mask, sample.image, size)
    except DatasetError as exc:
        return str(exc)
    return None


def _emptied_train_categories(samples: Sequence[Sample], good: Sequence[Sample]) -> list[str]:
    """Categories that had training samples in `samples` and have none left in `good`."""
    before = {s.category for s in samples if s.split == "train"}
    after = {s.category for s in good if s.split == "train"}
    return sorted(before - after)


def validate_samples(
    samples: list[Sample], skip_bad: bool = False, threads: int = 4
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Decode every image and mask of `samples` to find the unusable ones before any work starts.

    Each image is decoded with :func:`onenip.images.load_image` (which also applies the size limit
    :data:`onenip.images.MAX_PIXELS`) and each mask with :func:`onenip.images.load_mask`, checked to have the size of
    its image. Files are decoded by `threads` threads (1: in the calling thread); the result does not depend on it.
    A sample is bad when its image or its mask is: a defective sample with a bad mask is left out as a whole.

    Args:
        samples: the samples to check, e.g. from :func:`read_sources`.
        skip_bad: False: any bad sample is an error. True: bad samples are left out, with one warning.
        threads: number of decoding threads, at least 1.

    Returns:
        ``(good, bad)``: the usable samples in their given order, and each unusable sample with the reason, in
        their given order. Without `skip_bad`, `bad` is always empty.

    Raises:
        DatasetError: without `skip_bad`, when any sample is bad: one error counting them and naming up to
            :data:`MAX_LISTED_PROBLEMS` files with the reason. With `skip_bad`, when skipping leaves a category
            that had training samples without any (a model cannot get prompts for it), or leaves no sample.
        ValueError: `threads` is less than 1.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    samples = list(samples)
    if threads == 1 or len(samples) < 2:
        problems = [_sample_problem(s) for s in samples]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(samples)), thread_name_prefix="onenip-validate") as pool:
            problems = list(pool.map(_sample_problem, samples))
    good = [s for s, problem in zip(samples, problems) if problem is None]
    bad = [(s, problem) for s, problem in zip(samples, problems) if problem is not None]
    if not bad:
        return good, []
    listed = _listing([reason for _, reason in bad])
    count = f"{len(bad)} of {len(samples)} sample{'' if len(samples) == 1 else 's'}"
    if not skip_bad:
        raise DatasetError(
            f"{count} cannot be used:{listed}\n"
            "fix or remove these files, or set data.skip_bad=true to leave them out (with a warning)"
        )
    emptied = _emptied_train_categories(samples, good)
    if emptied:
        raise DatasetError(
            f"data.skip_bad: every training image of categor{'y' if len(emptied) == 1 else 'ies'} "
            f"{', '.join(emptied)} is unusable, so a model cannot get normal image prompts for "
            f"{'it' if len(emptied) == 1 else 'them'}; fix the files or leave the categor"
            f"{'y' if len(emptied) == 1 else 'ies'} out with data.categories:{listed}"
        )
    if not good:
        raise DatasetError(f"data.skip_bad: all {len(samples)} samples are unusable:{listed}")
    warnings.warn(f"data.skip_bad: left out {count} that cannot be used:{listed}", stacklevel=2)
    return good, bad


def group_by_category(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by category, categories in sorted order, samples in their given order."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.category, []).append(sample)
    return {category: groups[category] for category in sorted(groups)}


def load_split(specs: Sequence[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False,
               threads: int = 4) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """`read_sources` then `validate_samples`: the usable samples of a split and the skipped ones with reasons."""
    samples = read_sources(specs, split, categories, skip_bad=skip_bad)
    return validate_samples(samples, skip_bad=skip_bad, threads=threads)
