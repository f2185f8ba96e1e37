"""The :class:`Sample` record and the file-system helpers shared by the dataset readers.

The helpers look at names and file kinds only (nothing is decoded here). A folder that cannot be listed or a path that
cannot be examined is a DatasetError naming it; a missing folder lists as empty, so that each reader can say what it
expected there.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onenip.errors import DatasetError, OnenipWarning

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""Lower-case suffixes of the files taken as images (compared case-insensitively)."""

SPLITS: tuple[str, ...] = ("train", "test")
FORMATS: tuple[str, ...] = ("mvtec", "visa", "btad", "jsonl")

MAX_LISTED_PROBLEMS = 10
"""Most bad files (or categories) named one by one in an error or warning; the rest are counted."""

NORMAL_DEFECT = "good"


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


def absolute(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute and normalised, with ``~`` expanded, without resolving symbolic links."""
    return Path(os.path.abspath(Path(path).expanduser()))


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


_NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
"""errno values meaning "there is no such file or folder" (a missing path, a file used as a folder, a link loop)."""


def os_reason(exc: OSError) -> str:
    """A short reason for an OSError, without the path (which the caller's message names)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc) or type(exc).__name__


def path_kind(path: Path) -> str:
    """``"folder"``, ``"file"``, ``"missing"`` (including broken links) or ``"other"`` (a device, a pipe...).

    Raises:
        DatasetError: `path` cannot be examined (e.g. its parent folder is not readable), naming it.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in _NOT_THERE:
            return "missing"
        raise DatasetError(f"cannot examine {path}: {os_reason(exc)}") from exc
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def is_folder(path: Path) -> bool:
    """True for an existing folder (or a link to one); raises DatasetError when `path` cannot be examined."""
    return path_kind(path) == "folder"


def is_file(path: Path) -> bool:
    """True for an existing regular file (or a link to one); raises DatasetError when `path` cannot be examined."""
    return path_kind(path) == "file"


def missing_file_message(what: str, path: Path, where: str) -> str:
    """``<what> <path> <where> does not exist``, or says it is a broken link or not a file."""
    if os.path.islink(path) and path_kind(path) == "missing":
        return f"{what} {path} {where} is a broken symbolic link (its target {os.readlink(path)} does not exist)"
    if path_kind(path) != "missing":
        return f"{what} {path} {where} is not a file"
    return f"{what} {path} {where} does not exist"


def file_in_the_way(folder: Path, top: Path) -> Path | None:
    """The first of `folder` and its parents below `top` that exists but is not a folder (a file named like a
    folder), or None."""
    current = folder
    while current != top and top in current.parents:
        if path_kind(current) not in ("folder", "missing"):
            return current
        current = current.parent
    return None


def check_folder(root: Path, what: str) -> None:
    """Raise unless `root` is an existing folder."""
    kind = path_kind(root)
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
        raise DatasetError(f"cannot list folder {folder}: {os_reason(exc)}") from exc


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


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside `folder` (see :func:`_is_image_entry`), sorted by name. Other visible files
    are left out with a warning that counts and names them (a .webp or .gif photo is not read).

    Empty if the folder does not exist; raises DatasetError if it cannot be listed.
    """
    entries = _entries(folder)
    images = [Path(entry.path) for entry in entries if _is_image_entry(entry)]
    other = [e.name for e in entries if not e.name.startswith(".") and not _is_image_entry(e) and not _entry_is_folder(e)]
    warn_unsupported(str(folder), other)
    return images


def warn_unsupported(where: str, names: Sequence[str]) -> None:
    """Warn that the files `names` found in `where` are not read (not images of a supported type)."""
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"{where}: {len(names)} files that are not images of a supported type "
                      f"({', '.join(sorted(IMAGE_EXTENSIONS))}) are left out: {shown}", OnenipWarning, stacklevel=3)


def _entry_is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def list_subfolders(folder: Path) -> list[Path]:
    """The visible subfolders of `folder`, sorted by name; empty if the folder does not exist."""
    return [Path(e.path) for e in _entries(folder) if not e.name.startswith(".") and _entry_is_folder(e)]


def index_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of `folder` keyed by stem; when two share a stem, the first in name order wins."""
    index: dict[str, Path] = {}
    for path in list_images(folder):
        index.setdefault(path.stem, path)
    return index


def find_mask(index: dict[str, Path], stem: str, candidates: Sequence[str]) -> Path | None:
    """The first mask of `index` named by one of `candidates` (format strings over ``stem``), or None."""
    for pattern in candidates:
        found = index.get(pattern.format(stem=stem))
        if found is not None:
            return found
    return None


def sort_samples(samples: Iterable[Sample]) -> list[Sample]:
    """Samples in a deterministic order: by category, then image path."""
    return sorted(samples, key=lambda s: (s.category, s.image.as_posix()))


def select_categories(available: Iterable[str], categories: Sequence[str] | None, where: str) -> list[str]:
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


def require_samples(samples: list[Sample], split: str, where: Path) -> list[Sample]:
    if not samples:
        raise DatasetError(f"no {split} images found in {where}")
    return samples


def listing(items: Sequence[str]) -> str:
    """Up to :data:`MAX_LISTED_PROBLEMS` items, one per indented line, then how many more there are."""
    lines = [f"\n  - {item}" for item in items[:MAX_LISTED_PROBLEMS]]
    if len(items) > MAX_LISTED_PROBLEMS:
        lines.append(f"\n  ... and {len(items) - MAX_LISTED_PROBLEMS} more")
    return "".join(lines)


def keep_first(seen: dict[Path, tuple[int, Sample]], sample: Sample, line: int, source: Path) -> bool:
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


def group_by_category(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by category, categories in sorted order, samples in their given order."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.category, []).append(sample)
    return {category: groups[category] for category in sorted(groups)}
