"""Reading dataset roots: format detection, one or several roots merged into one set, and the decoding check."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from onenip.data.files import (
    FORMATS,
    SPLITS,
    Sample,
    absolute,
    check_folder,
    check_split,
    is_file,
    is_folder,
    list_subfolders,
    listing,
    select_categories,
    sort_samples,
)
from onenip.data.folders import folder_categories, read_btad, read_mvtec
from onenip.data.images import load_image, load_mask
from onenip.data.listed import JSONL_SUFFIXES, VISA_CSV, jsonl_meta_file, read_jsonl, read_visa
from onenip.errors import DatasetError, OnenipWarning


def _has_subfolder_with(root: Path, relative: str) -> bool:
    """True if a subfolder of `root` holds the folder `relative`; subfolders that cannot be examined do not."""
    for folder in list_subfolders(root):
        try:
            if is_folder(folder / relative):
                return True
        except DatasetError:
            continue
    return False


def detect_format(root: str | os.PathLike[str]) -> str:
    """The layout of the dataset folder `root`: ``"visa"``, ``"jsonl"``, ``"btad"`` or ``"mvtec"``.

    Checked in that order: ``split_csv/1cls.csv``; ``train``/``test`` ``.json``/``.jsonl`` files; a subfolder with
    ``train/ok``; a subfolder with ``train/good``; then, for a folder of labelled images only, ``test/ok`` (btad) and
    ``test/good`` (mvtec).

    Raises:
        DatasetError: `root` is missing or matches no layout.
    """
    path = absolute(root)
    check_folder(path, "dataset root")
    if is_file(path / VISA_CSV):
        return "visa"
    if any(is_file(path / f"{split}{suffix}") for split in SPLITS for suffix in JSONL_SUFFIXES):
        return "jsonl"
    if _has_subfolder_with(path, "train/ok"):
        return "btad"
    if _has_subfolder_with(path, "train/good"):
        return "mvtec"
    if _has_subfolder_with(path, "test/ok"):  # labelled images only (onenip test, onenip calibrate --val)
        return "btad"
    if _has_subfolder_with(path, "test/good"):
        return "mvtec"
    raise DatasetError(
        f"cannot tell the dataset format of {path}: looked for split_csv/1cls.csv (visa), train.json/test.json or "
        ".jsonl (jsonl), <category>/train/ok or test/ok (btad) and <category>/train/good or test/good (mvtec); "
        "prefix the path with FORMAT: to choose one"
    )


def _parse_spec(spec: str) -> tuple[str | None, str]:
    """``FORMAT:PATH`` split into (format, path); (None, spec) when the prefix is not a known format."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.strip().lower() in FORMATS:
        return prefix.strip().lower(), rest
    return None, spec


def check_roots(specs: Sequence[str]) -> None:
    """The cheap part of `read_sources`' checks, for a run to make before slower ones (its backbone weights): no
    roots, an empty path or a root that is not a folder raise DatasetError naming it."""
    if not specs:
        raise DatasetError("data.roots is empty: give at least one dataset root")
    for spec in specs:
        _root_of(spec)


def _root_of(spec: str) -> tuple[str | None, Path]:
    """(format or None, absolute root folder) of ``[FORMAT:]PATH``; an empty path or a missing root raise."""
    fmt, path_text = _parse_spec(spec)
    if not path_text.strip():
        raise DatasetError(f"dataset root {spec!r} has an empty path")
    root = absolute(path_text)
    check_folder(root, "dataset root")
    return fmt, root


def absolute_spec(spec: str) -> str:
    """``[FORMAT:]PATH`` with PATH made absolute (a run's saved configuration then works from any folder)."""
    fmt, path = _parse_spec(spec)
    if not path.strip():
        return spec  # an error for check_roots to name
    path = str(Path(path).expanduser().absolute())
    return f"{fmt}:{path}" if fmt else path


def _categories_of(spec: str, split: str) -> set[str]:
    """The category names of one root (for the folder layouts, every subfolder holding `split`, usable or not)."""
    fmt, root = _root_of(spec)
    if (fmt or detect_format(root)) in ("mvtec", "btad"):
        available, unreadable = folder_categories(root, split)
        return {*available, *unreadable}
    # listed formats: reading the list is cheap; only names are wanted here, so no category's training images are
    # checked (the categories chosen are, when they are read)
    return {s.category for s in read_source(spec, split, labelled_only=True)}


def read_source(
    spec: str, split: str, categories: Sequence[str] | None = None, skip_bad: bool = False, labelled_only: bool = False
) -> list[Sample]:
    """Samples of one dataset root given as ``PATH`` (format detected) or ``FORMAT:PATH``.

    FORMAT is one of mvtec, visa, btad, jsonl; any other prefix is part of the path (so ``C:\\data`` works). For
    jsonl, PATH is a folder holding ``<split>.json`` (or ``.jsonl``) whose image paths are relative to it.
    `skip_bad` leaves out the categories without training images of the folder layouts (mvtec, btad), with a
    warning; visa and jsonl list their files explicitly and a listed file that is missing stays an error.
    `labelled_only`: the test split of a folder layout whose categories need no training images (see `read_mvtec`);
    for every layout it also skips the check that the chosen categories have training images.

    Raises:
        DatasetError: an empty or missing path, or any error of the format's reader.
    """
    check_split(split)
    fmt, root = _root_of(spec)
    fmt = fmt or detect_format(root)
    if fmt == "mvtec":
        return read_mvtec(root, split, categories, skip_bad, labelled_only)
    if fmt == "btad":
        return read_btad(root, split, categories, skip_bad, labelled_only)
    samples = read_jsonl(jsonl_meta_file(root, split), root, split, categories) if fmt == "jsonl" else \
        read_visa(root, split, categories)
    if split == "test" and not labelled_only:  # as the folder layouts: a category to test needs training images
        _check_trained_categories(spec, fmt, root, samples)
    return samples


def _check_trained_categories(spec: str, fmt: str, root: Path, test: list[Sample]) -> None:
    """Raise if a category of the test split of a listed format (visa, jsonl) has no normal training image listed."""
    wanted = sorted({s.category for s in test})
    try:
        with warnings.catch_warnings():  # the train split's own warnings are given when it is read for training
            warnings.simplefilter("ignore")
            train = read_jsonl(jsonl_meta_file(root, "train"), root, "train", None) if fmt == "jsonl" else \
                read_visa(root, "train", None)
        trained = {s.category for s in train}
    except DatasetError:
        trained = set()
    untrained = [c for c in wanted if c not in trained]
    if untrained:
        raise DatasetError(f"{spec}: categories {', '.join(untrained)} have test images but no normal training image "
                           "listed, so no model can know them; leave them out with data.categories, or list their "
                           "training images")


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
    specs: Sequence[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False,
    labelled_only: bool = False,
) -> list[Sample]:
    """Samples of several dataset roots merged into one unified set (one model for several datasets).

    Each spec is read by :func:`read_source` (with `skip_bad` and `labelled_only`); `categories` (None or empty: all) filters across
    all sources. Images are not decoded: pass the result to :func:`validate_samples` for that.

    Raises:
        DatasetError: no specs, the same root listed twice, two roots sharing a category name, an unknown
            requested category (listing those of every source), or any error of a reader.
    """
    check_split(split)
    check_roots(specs)
    repeated = sorted({s for s in specs if list(specs).count(s) > 1})
    if repeated:
        raise DatasetError(f"data.roots lists {', '.join(repeated)} more than once")
    if categories:  # each root reads only the chosen of its categories: the others may be unusable
        wanted = {categories} if isinstance(categories, str) else set(categories)
        names = {spec: _categories_of(spec, split) for spec in specs}
        available = set().union(*names.values())
        select_categories(available, categories, f"data.roots ({', '.join(specs)})")  # an unknown one is an error
        per_source = [(spec, read_source(spec, split, sorted(wanted & names[spec]), skip_bad, labelled_only)
                       if wanted & names[spec] else []) for spec in specs]
    else:
        per_source = [(spec, read_source(spec, split, skip_bad=skip_bad, labelled_only=labelled_only)) for spec in specs]
        available = {s.category for _, samples in per_source for s in samples}
    chosen = set(select_categories(available, categories, f"data.roots ({', '.join(specs)})"))
    per_source = [(spec, [s for s in samples if s.category in chosen]) for spec, samples in per_source]
    _check_collisions(per_source)
    return sort_samples(s for _, samples in per_source for s in samples)


def _sample_problem(sample: Sample) -> str | None:
    """Why `sample` cannot be used (its image, or its mask, cannot be decoded or do not match), or None."""

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

    Each image is decoded with :func:`onenip.data.images.load_image` (which also applies the size limit
    :data:`onenip.data.images.MAX_PIXELS`) and each mask with :func:`onenip.data.images.load_mask`, checked to have the size of
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
    listed = listing([reason for _, reason in bad])
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
    warnings.warn(f"data.skip_bad: left out {count} that cannot be used:{listed}", OnenipWarning, stacklevel=2)
    return good, bad


def load_split(specs: Sequence[str], split: str, categories: Sequence[str] | None = None, skip_bad: bool = False,
               threads: int = 4, labelled_only: bool = False) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """`read_sources` then `validate_samples`: the usable samples of a split and the skipped ones with reasons."""
    samples = read_sources(specs, split, categories, skip_bad=skip_bad, labelled_only=labelled_only)
    return validate_samples(samples, skip_bad=skip_bad, threads=threads)
