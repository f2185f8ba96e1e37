"""Readers of the folder-per-category layouts: MVTec AD and BTAD.

``<root>/<category>/train/<normal>/*``, ``<root>/<category>/test/<type>/*`` and masks
``<root>/<category>/ground_truth/<type>/<stem>[_mask].<ext>``; the two layouts differ only in their folder names
(:class:`_FolderLayout`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from onenip.data.files import (
    NORMAL_DEFECT,
    Sample,
    absolute,
    check_folder,
    check_split,
    file_in_the_way,
    find_mask,
    index_by_stem,
    is_folder,
    list_images,
    list_subfolders,
    listing,
    os_reason,
    path_kind,
    select_categories,
    sort_samples,
)
from onenip.errors import DatasetError, OnenipWarning


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


def folder_categories(root: Path, split: str) -> tuple[list[str], dict[str, str]]:
    """The categories of a folder layout: (names, {name: reason} of the subfolders that cannot be looked into).

    For the train split a category is a subfolder holding ``train/`` or ``test/`` (so a category with test images
    but no training images is found, and reported); for the test split, one holding ``test/``.
    """
    markers = ("train", "test") if split == "train" else ("test",)
    names: list[str] = []
    unreadable: dict[str, str] = {}
    for folder in list_subfolders(root):
        try:
            if any(is_folder(folder / marker) for marker in markers):
                names.append(folder.name)
        except DatasetError as exc:
            reason = os_reason(exc.__cause__) if isinstance(exc.__cause__, OSError) else str(exc)
            unreadable[folder.name] = f"category folder {folder} cannot be read: {reason}"
    return names, unreadable


def _train_images(cat_dir: Path, layout: _FolderLayout) -> list[Path]:
    """The training images of a category; raises DatasetError naming the category when there are none."""
    folder = cat_dir / "train" / layout.normal_folder
    try:
        images = list_images(folder)
        kind = path_kind(folder)
        in_the_way = file_in_the_way(folder, cat_dir)
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


def _folder_test_type(cat_dir: Path, folder_name: str, layout: _FolderLayout) -> list[Sample]:
    """Samples of one ``test/<folder_name>`` folder, defective images paired with their masks."""
    images = list_images(cat_dir / "test" / folder_name)
    if folder_name == layout.normal_folder:
        return [Sample(p, cat_dir.name, 0, NORMAL_DEFECT, None, "test") for p in images]
    mask_folder = cat_dir / "ground_truth" / folder_name
    in_the_way = file_in_the_way(mask_folder, cat_dir)
    if in_the_way is not None:
        raise DatasetError(f"{layout.name} mask folder {mask_folder} is not a folder ({in_the_way} is a file)")
    masks = index_by_stem(mask_folder)
    defect = layout.defect_name or folder_name
    return [
        Sample(p, cat_dir.name, 1, defect, find_mask(masks, p.stem, layout.mask_names), "test") for p in images
    ]


def _folder_test(cat_dir: Path, layout: _FolderLayout) -> list[Sample]:
    test_dir = cat_dir / "test"
    if layout.defect_folders is None:
        folders = [p.name for p in list_subfolders(test_dir)]
    else:
        folders = [layout.normal_folder, *layout.defect_folders]
    samples = [s for name in folders for s in _folder_test_type(cat_dir, name, layout)]
    if not samples:
        raise DatasetError(f"{layout.name} test folder {test_dir} holds no images (looked in {', '.join(folders)})")
    return samples


def _usable_categories(
    root: Path, chosen: list[str], unreadable: dict[str, str], layout: _FolderLayout, skip_bad: bool
) -> dict[str, list[Path]]:
    """The chosen categories that have training images, with those images (each training folder is listed here only,
    so its warnings are given once). The others raise one DatasetError listing them all, or with `skip_bad` are
    dropped with one warning (an error still when none is left)."""
    problems: dict[str, str] = {}
    usable: dict[str, list[Path]] = {}
    for cat in chosen:
        if cat in unreadable:
            problems[cat] = unreadable[cat]
            continue
        try:
            usable[cat] = _train_images(root / cat, layout)
        except DatasetError as exc:
            problems[cat] = str(exc)
    if not problems:
        return usable
    listed = listing(list(problems.values()))
    count = f"{len(problems)} of {len(chosen)} categor{'y' if len(chosen) == 1 else 'ies'}"
    if not skip_bad or not usable:
        hint = "" if skip_bad else "; set data.skip_bad=true to leave them out (with a warning),"
        raise DatasetError(
            f"{count} of {layout.name} root {root} cannot be used:{listed}\n"
            f"add training images{hint} or choose categories with data.categories"
        )
    warnings.warn(f"data.skip_bad: left out {count} of {layout.name} root {root}:{listed}", OnenipWarning, stacklevel=4)
    return usable


def _read_folder_layout(
    root: str | os.PathLike[str],
    split: str,
    categories: Sequence[str] | None,
    layout: _FolderLayout,
    skip_bad: bool = False,
    labelled_only: bool = False,
) -> list[Sample]:
    check_split(split)
    if labelled_only and split != "test":
        raise ValueError("labelled_only reads the test split")
    root_path = absolute(root)
    check_folder(root_path, f"{layout.name} root")
    available, unreadable = folder_categories(root_path, split)
    if not available and not unreadable:
        raise DatasetError(
            f"{layout.name} root {root_path} has no categories: no subfolder holds a '{split}' folder"
        )
    if categories:
        requested = {categories} if isinstance(categories, str) else set(categories)
        unreadable = {name: reason for name, reason in unreadable.items() if name in requested}
    chosen = select_categories([*available, *unreadable], categories, f"{layout.name} root {root_path}")
    if labelled_only:
        if unreadable.keys() & set(chosen):
            raise DatasetError(f"{layout.name} root {root_path} cannot be read:"
                               + listing([unreadable[c] for c in chosen if c in unreadable]))
        return sort_samples(s for cat in chosen for s in _folder_test(root_path / cat, layout))
    train = _usable_categories(root_path, chosen, unreadable, layout, skip_bad)
    if split == "train":
        return sort_samples(Sample(p, cat, 0, NORMAL_DEFECT, None, "train") for cat, images in train.items() for p in images)
    return sort_samples(s for cat in train for s in _folder_test(root_path / cat, layout))


def read_mvtec(
    root: str | os.PathLike[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False,
    labelled_only: bool = False,
) -> list[Sample]:
    """Samples of an MVTec AD style folder (any number of categories).

    A category is a subfolder of `root` holding ``train/`` or ``test/`` (only ``test/`` counts for the test
    split). Test images of ``test/good`` are normal; the others are defective with defect type = folder name and the
    mask ``ground_truth/<type>/<stem>_mask.<ext>`` (or ``<stem>.<ext>``) when present, else None.

    Every category read, for either split, must have at least one training image in ``train/good`` (one is enough:
    it is its own prompt): a model cannot get normal-image prompts for a category without. Such a category, or a
    category folder that cannot be read, is an error naming it; with `skip_bad` it is left out with one warning
    (still an error when no category is left). `labelled_only` (test split only) reads a folder of labelled images
    (``test/`` alone, e.g. for `onenip calibrate --val`), which the deployed model judges with its own prompt pool:
    its categories need no training images. Images are not decoded here: see :func:`validate_samples`.

    Raises:
        DatasetError: missing root, no categories, an unknown requested category, a category without training
            images, a folder that cannot be listed, or a test folder without images.
    """
    return _read_folder_layout(root, split, categories, _MVTEC, skip_bad, labelled_only)


def read_btad(
    root: str | os.PathLike[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False,
    labelled_only: bool = False,
) -> list[Sample]:
    """Samples of a BTAD style folder: ``train/ok``, ``test/ok`` (normal) and ``test/ko`` (defective).

    Defective images get defect type ``"ko"`` and the mask ``ground_truth/ko/<stem>.<ext>`` when present.
    Categories without training images are handled as by :func:`read_mvtec`.

    Raises:
        DatasetError: as :func:`read_mvtec`.
    """
    return _read_folder_layout(root, split, categories, _BTAD, skip_bad, labelled_only)
