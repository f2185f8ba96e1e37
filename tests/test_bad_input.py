"""Bad input: folders assembled by hand must end in a DatasetError naming the file, or with skip_bad in one warning
and the file skipped and counted; never a library traceback, never a silently wrong result.

The property test builds a fresh MVTec-layout folder per generated example (``tempfile.TemporaryDirectory`` in the
test body: pytest's ``tmp_path`` is per test, not per example) from a random mix of good images and bad files, and
checks :func:`read_mvtec` + :func:`validate_samples` against what was planted. The plain tests below cover each case
one at a time, including those a generated folder cannot hold (permissions, decompression-bomb limit, PIL state).
"""

from __future__ import annotations

import builtins
import io
import os
import struct
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

import onenip.data.images as images
from onenip.data import (
    MAX_LISTED_PROBLEMS,
    Sample,
    detect_format,
    group_by_category,
    read_btad,
    read_mvtec,
    read_source,
    read_sources,
    read_visa,
    validate_samples,
)
from onenip.data.images import MAX_PIXELS, load_image, load_mask, read_sample
from onenip.errors import DatasetError

SIZE = (12, 10)  # width, height of the plain tests' images

# --------------------------------------------------------------------------------------------------------------------
# File builders (bytes written by hand where Pillow cannot produce the defect)
# --------------------------------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` grey pixels, followed by a few bytes of pixel data only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b"")


def noise(size: tuple[int, int], mode: str, seed: int = 0) -> Image.Image:
    """A `size` (width, height) image of random pixels (incompressible, so any cut loses pixel data)."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def truncated(data: bytes, fraction: float) -> bytes:
    """`data` cut before the end of its pixel data: a PNG still decodes when only its CRC and IEND are cut."""
    return data[: min(int(len(data) * fraction), len(data) - 32)]


def mask_image(size: tuple[int, int], mode: str) -> Image.Image:
    """A mask of `size` with a foreground rectangle, in `mode` (L, 1, P, RGB or I;16)."""
    width, height = size
    values = np.zeros((height, width), dtype=np.uint8)
    values[1 : height // 2 + 1, 2 : width // 2 + 2] = 255
    if mode == "I;16":
        return Image.fromarray(values.astype(np.uint16) * 257)
    if mode == "RGB":
        return Image.fromarray(np.stack([values, np.zeros_like(values), np.zeros_like(values)], axis=2))
    return Image.fromarray(values).convert(mode)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_category(root: Path, name: str, train: int = 2, defects: int = 1) -> Path:
    """An MVTec category with `train` training images, one normal test image and `defects` masked defective ones."""
    cat = root / name
    for i in range(train):
        save(noise(SIZE, "RGB", i), cat / "train" / "good" / f"{i:03d}.png")
    save(noise(SIZE, "RGB", 50), cat / "test" / "good" / "100.png")
    for i in range(defects):
        save(noise(SIZE, "RGB", 60 + i), cat / "test" / "crack" / f"{200 + i}.png")
        save(mask_image(SIZE, "L"), cat / "ground_truth" / "crack" / f"{200 + i}_mask.png")
    return cat


@dataclass
class Captured:
    """Warnings recorded by :func:`capture`."""

    items: list[warnings.WarningMessage] = field(default_factory=list)

    @property
    def messages(self) -> list[str]:
        """The warnings, less those naming non-image files left out of a listing (the planted noise, notes.txt, is
        named by one such warning per folder: tests/test_listed_formats.py checks them)."""
        return [str(w.message) for w in self.items if "files that are not images of a supported type" not in str(w.message)]


@contextmanager
def capture() -> Iterator[Captured]:
    """Record every warning (action ``always``) raised inside the block."""
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        yield Captured(recorded)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# Generated dataset folders (hypothesis)
# --------------------------------------------------------------------------------------------------------------------

GOOD_FORMATS = (
    ("PNG", "L", ".png"),
    ("PNG", "RGB", ".png"),
    ("PNG", "RGBA", ".PNG"),
    ("PNG", "I;16", ".png"),
    ("JPEG", "RGB", ".jpg"),
    ("JPEG", "L", ".jpeg"),
    ("BMP", "RGB", ".bmp"),
    ("BMP", "L", ".bmp"),
)
BAD_IMAGES = ("truncated_png", "truncated_jpeg", "zero_byte", "text", "big_header", "huge_header", "zero_header", "broken_link")
GOOD_MASK_MODES = ("L", "1", "P", "RGB", "I;16")
BAD_MASKS = ("mask_wrong_size", "mask_truncated", "mask_zero_byte", "mask_text", "mask_broken_link")
NAME_PARTS = ("img", "ü", "日本語", "a b", "ñé-", os.fsdecode(b"\xff\xfe"), "x.y")
CATEGORY_NAMES = ("bottle", "flasché", "瓶", "two words", os.fsdecode(b"cat\xe9"))
DEFECT_NAMES = ("crack", "défaut", "穴")


@dataclass(frozen=True)
class ImagePlan:
    """One image file to plant: good (format, mode) or bad (kind)."""

    bad: str | None
    fmt: tuple[str, str, str]
    size: tuple[int, int]
    cut: float
    part: str
    mask: str | None = None
    """For defective test images: None (no mask), a good mask mode, or a bad mask kind."""


@dataclass(frozen=True)
class CategoryPlan:
    name: str
    train: tuple[ImagePlan, ...]
    train_folder: bool
    test_good: tuple[ImagePlan, ...]
    defects: tuple[tuple[str, tuple[ImagePlan, ...]], ...]
    noise: bool
    """Also plant files the reader must ignore: a folder named x.png, a hidden image, a text file."""


@st.composite
def image_plans(draw: st.DrawFn, with_mask: bool = False) -> ImagePlan:
    bad = draw(st.one_of(st.none(), st.none(), st.sampled_from(BAD_IMAGES)))
    mask = None
    if with_mask:
        mask = draw(st.one_of(st.none(), st.sampled_from(GOOD_MASK_MODES), st.sampled_from(BAD_MASKS)))
    return ImagePlan(
        bad=bad,
        fmt=draw(st.sampled_from(GOOD_FORMATS)),
        size=(draw(st.integers(8, 20)), draw(st.integers(8, 20))),
        cut=draw(st.floats(0.0, 0.75)),
        part=draw(st.sampled_from(NAME_PARTS)),
        mask=mask,
    )


@st.composite
def category_plans(draw: st.DrawFn, name: str) -> CategoryPlan:
    no_training_images = draw(st.integers(0, 7)) == 0  # rare: it ends the reading before any file is decoded
    train = () if no_training_images else tuple(draw(st.lists(image_plans(), min_size=1, max_size=3)))
    defect_names = draw(st.lists(st.sampled_from(DEFECT_NAMES), min_size=0, max_size=2, unique=True))
    defects = tuple((d, tuple(draw(st.lists(image_plans(with_mask=True), min_size=1, max_size=2)))) for d in defect_names)
    test_good = tuple(draw(st.lists(image_plans(), min_size=0 if defects else 1, max_size=2)))
    return CategoryPlan(name, train, bool(train) or draw(st.booleans()), test_good, defects, draw(st.booleans()))


@st.composite
def dataset_plans(draw: st.DrawFn) -> tuple[CategoryPlan, ...]:
    names = draw(st.lists(st.sampled_from(CATEGORY_NAMES), min_size=1, max_size=2, unique=True))
    return tuple(draw(category_plans(name)) for name in names)


@dataclass
class Planted:
    """What a generated folder holds, sample by sample (keyed by the unique image file name)."""

    category: dict[str, str] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)
    bad_file: dict[str, str] = field(default_factory=dict)
    """Image name -> name of the bad file (the image itself, or its mask) for the bad samples."""

    def names(self, categories: set[str], good: bool) -> set[str]:
        return {n for n, c in self.category.items() if c in categories and (n not in self.bad_file) == good}


def write_bad(path: Path, kind: str, plan: ImagePlan) -> None:
    """Plant the bad file `kind` at `path`."""
    if kind in ("truncated_png", "mask_truncated"):
        write(path, truncated(encode(noise(plan.size, "RGB"), "PNG"), plan.cut))
    elif kind == "truncated_jpeg":
        write(path, truncated(encode(noise(plan.size, "RGB"), "JPEG"), plan.cut))
    elif kind.endswith("zero_byte"):
        write(path, b"")
    elif kind.endswith("text"):
        write(path, "not an image, ünïcödé\n".encode())
    elif kind == "big_header":  # over onenip's limit, under twice it: onenip's own check (Pillow only warns)
        write(path, png_header_only(12_000, 9_000))
    elif kind == "huge_header":  # over twice the limit: Pillow's DecompressionBombError, converted
        write(path, png_header_only(20_000, 20_000))
    elif kind == "zero_header":
        write(path, png_header_only(0, 5))
    elif kind.endswith("broken_link"):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.parent / f"missing-{path.name}", path)
    elif kind == "mask_wrong_size":
        save(mask_image((plan.size[0] + 1, plan.size[1]), "L"), path)
    else:
        raise AssertionError(kind)


def plant(root: Path, plans: tuple[CategoryPlan, ...]) -> Planted:
    """Write the folder described by `plans` under `root`; return what a correct reader must find."""
    planted = Planted()
    counter = iter(range(10_000))

    def put(folder: Path, plan: ImagePlan, category: str, split: str) -> Path:
        fmt, mode, ext = plan.fmt
        name = f"{plan.part}{next(counter):03d}{ext}"
        path = folder / name
        if plan.bad is None:
            write(path, encode(noise(plan.size, mode, len(name)), fmt))
        else:
            write_bad(path, plan.bad, plan)
            planted.bad_file[name] = name
        planted.category[name] = category
        planted.split[name] = split
        return path

    for cat in plans:
        cat_dir = root / cat.name
        train_dir = cat_dir / "train" / "good"
        if cat.train_folder:
            train_dir.mkdir(parents=True)
        for plan in cat.train:
            put(train_dir, plan, cat.name, "train")
        for plan in cat.test_good:
            put(cat_dir / "test" / "good", plan, cat.name, "test")
        for defect, defect_plans in cat.defects:
            for plan in defect_plans:
                image = put(cat_dir / "test" / defect, plan, cat.name, "test")
                if plan.mask is None:
                    continue
                mask_path = cat_dir / "ground_truth" / defect / f"{Path(image.name).stem}_mask.png"
                if plan.mask in GOOD_MASK_MODES:
                    save(mask_image(plan.size, plan.mask), mask_path)
                else:
                    write_bad(mask_path, plan.mask, plan)
                    planted.bad_file.setdefault(image.name, mask_path.name)
        if cat.noise:
            save(noise((4, 4), "L"), train_dir / "folder.png" / "inside.png")
            write(train_dir / ".hidden.png", b"")
            write(train_dir / "notes.txt", b"not an image")
    return planted


def read_both(root: Path, skip_bad: bool) -> list[Sample]:
    return read_mvtec(root, "train", skip_bad=skip_bad) + read_mvtec(root, "test", skip_bad=skip_bad)


def names_of(samples: list[Sample]) -> set[str]:
    return {s.image.name for s in samples}


def check_without_skip(root: Path, plans: tuple[CategoryPlan, ...], planted: Planted, tally: Counter[str]) -> None:
    """skip_bad=False: exactly the planted samples, or one DatasetError naming a planted bad category or file."""
    empty = {c.name for c in plans if not c.train}
    all_categories = {c.name for c in plans}
    with capture() as caught:
        if empty:
            with pytest.raises(DatasetError) as error:
                read_mvtec(root, "train")
            assert any(name in str(error.value) for name in empty), str(error.value)
            tally["error: category without training images"] += 1
            return
        samples = read_both(root, skip_bad=False)
        assert names_of(samples) == set(planted.category), "the reader must list every planted image, good or bad"
        assert len(samples) == len(planted.category)
        if planted.bad_file:
            with pytest.raises(DatasetError) as error:
                validate_samples(samples)
            message = str(error.value)
            assert any(bad in message for bad in planted.bad_file.values()), message
            assert f"{len(planted.bad_file)} of {len(samples)} samples" in message
            assert "data.skip_bad=true" in message
            tally["error: bad files"] += 1
        else:
            good, bad = validate_samples(samples)
            assert good == samples and bad == []
            assert names_of(good) == planted.names(all_categories, good=True)
            tally["clean"] += 1
    assert caught.messages == [], caught.messages


def check_with_skip(root: Path, plans: tuple[CategoryPlan, ...], planted: Planted, tally: Counter[str]) -> None:
    """skip_bad=True: the planted-good samples, the planted-bad ones skipped and counted, one warning."""
    kept = {c.name for c in plans if c.train}
    with capture() as caught:
        if not kept:
            with pytest.raises(DatasetError):
                read_mvtec(root, "train", skip_bad=True)
            tally["skip: error, no category with training images"] += 1
            return
        samples = read_both(root, skip_bad=True)
    dropped = {c.name for c in plans} - kept
    assert len(caught.messages) == (2 if dropped else 0), caught.messages  # one warning per split read
    assert all(any(name in message for name in dropped) for message in caught.messages)
    assert names_of(samples) == planted.names(kept, good=True) | planted.names(kept, good=False)

    bad_names = planted.names(kept, good=False)
    good_train = {n for n in planted.names(kept, good=True) if planted.split[n] == "train"}
    emptied = {c for c in kept if not any(planted.category[n] == c for n in good_train)}
    with capture() as caught:
        if emptied:
            with pytest.raises(DatasetError) as error:
                validate_samples(samples, skip_bad=True)
            assert any(name in str(error.value) for name in emptied), str(error.value)
            tally["skip: error, every training image of a category bad"] += 1
            return
        good, bad = validate_samples(samples, skip_bad=True)
    assert names_of(good) == planted.names(kept, good=True)
    assert [s.image.name for s, _ in bad] == [s.image.name for s in samples if s.image.name in bad_names]
    assert good == [s for s in samples if s.image.name not in bad_names], "order of the good samples is kept"
    for sample, reason in bad:
        assert planted.bad_file[sample.image.name] in reason, reason
    assert len(caught.messages) == (1 if bad_names else 0), caught.messages
    if bad_names:
        assert f"left out {len(bad_names)} of {len(samples)} sample" in caught.messages[0]
        assert all(issubclass(w.category, UserWarning) for w in caught.items)
    tally["skip: bad files skipped" if bad_names else "skip: clean"] += 1


MAX_EXAMPLES = 300


def test_generated_dataset_folders() -> None:
    """Random MVTec folders with good and bad files: a named DatasetError or exactly the planted result."""
    tally: Counter[str] = Counter()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(plans=dataset_plans())
    def check(plans: tuple[CategoryPlan, ...]) -> None:
        tally["examples"] += 1
        with tempfile.TemporaryDirectory(prefix="onenip-bad-") as tmp:
            root = Path(tmp) / "data ü"
            planted = plant(root, plans)
            check_without_skip(root, plans, planted, tally)
            check_with_skip(root, plans, planted, tally)
            tally["files planted"] += len(planted.category)
            tally["bad samples planted"] += len(planted.bad_file)

    check()
    print(f"\nhypothesis: {tally['examples']} generated dataset folders checked: {dict(sorted(tally.items()))}")
    assert tally["examples"] >= MAX_EXAMPLES


# --------------------------------------------------------------------------------------------------------------------
# Decompression-bomb limit and Pillow's global state
# --------------------------------------------------------------------------------------------------------------------


def test_max_pixels_is_documented_and_read_at_call_time() -> None:
    assert MAX_PIXELS == 100_000_000
    assert images.MAX_PIXELS == MAX_PIXELS
    assert "MAX_PIXELS" in images.__all__


def test_header_over_the_limit_names_file_and_size(tmp_path: Path) -> None:
    path = write(tmp_path / "big.png", png_header_only(12_000, 9_000))  # 108 M pixels: Pillow alone would only warn
    with capture() as caught, pytest.raises(DatasetError) as error:
        load_image(path)
    assert f"{path}: 12000x9000 pixels is more than the limit of 100,000,000" in str(error.value)
    assert caught.messages == []


def test_huge_header_is_a_dataset_error_not_a_pillow_one(tmp_path: Path) -> None:
    path = write(tmp_path / "huge.png", png_header_only(20_000, 20_000))  # 400 M: Pillow raises DecompressionBombError
    with capture() as caught, pytest.raises(DatasetError, match=r"huge\.png: 400,000,000 pixels is more than the limit"):
        load_mask(path)
    assert caught.messages == []


def test_between_pillow_and_onenip_limits_no_pillow_warning(tmp_path: Path) -> None:
    """95 M pixels: over Pillow's default warning threshold (89 M), under onenip's limit: no warning leaks."""
    path = write(tmp_path / "tall.png", png_header_only(9_500, 10_000))
    with capture() as caught, pytest.raises(DatasetError, match=r"tall\.png: image file is truncated"):
        load_image(path)  # the header passes; the missing pixel data is the error
    assert caught.messages == []


def test_lowered_limit_applies_to_ordinary_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(noise((12, 10), "RGB"), tmp_path / "ordinary.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with capture() as caught, pytest.raises(DatasetError, match=r"ordinary\.png: 12x10 pixels is more than the limit of 100 "):
        load_image(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 50)  # over twice the limit: Pillow's own error, converted
    with pytest.raises(DatasetError, match=r"ordinary\.png: 120 pixels is more than the limit of 50 "):
        load_image(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 120)
    assert load_image(path).size == (12, 10)
    assert caught.messages == []


def test_pillow_global_state_is_restored(tmp_path: Path) -> None:
    before_limit = Image.MAX_IMAGE_PIXELS
    before_filters = list(warnings.filters)
    for data in (png_header_only(20_000, 20_000), png_header_only(12_000, 9_000), b""):
        with pytest.raises(DatasetError):
            load_image(write(tmp_path / "x.png", data))
    tiff = save(noise(SIZE, "L"), tmp_path / "ok.tif")  # TIFF loads inside the guard
    assert load_image(tiff).size == SIZE
    assert Image.MAX_IMAGE_PIXELS == before_limit
    assert warnings.filters == before_filters


def test_truncated_images_are_never_loaded() -> None:
    import onenip  # noqa: F401 - the whole package imported must not have switched it on

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_gif_and_tiff_decode_under_the_guard(tmp_path: Path) -> None:
    for name in ("a.gif", "b.tiff"):
        assert load_image(save(noise(SIZE, "L"), tmp_path / name)).size == SIZE


# --------------------------------------------------------------------------------------------------------------------
# Unreadable image files
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_png_and_jpeg(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / f"cut.{fmt.lower()}", truncated(encode(noise((16, 16), "RGB"), fmt), 0.6))
    with pytest.raises(DatasetError, match=rf"cut\.{fmt.lower()}"):
        load_image(path)


def test_zero_byte_text_and_zero_size(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"empty\.png: cannot identify image file \(the file is empty: 0 bytes\)"):
        load_image(write(tmp_path / "empty.png", b""))
    with pytest.raises(DatasetError, match=r"text\.png: cannot identify image file \(not an image"):
        load_image(write(tmp_path / "text.png", b"hello\n"))
    with pytest.raises(DatasetError, match=r"flat\.png"):
        load_image(write(tmp_path / "flat.png", png_header_only(0, 5)))


def test_zero_size_header_check(tmp_path: Path) -> None:
    """Pillow refuses 0-pixel files itself today; onenip's own check is there for readers that do not."""
    img = Image.new("L", (1, 1))
    img._size = (0, 4)  # type: ignore[attr-defined] - what a lenient plugin could produce
    with pytest.raises(DatasetError, match=r"zero\.png is 0x4 pixels"):
        images._check_header_size(img, "image file zero.png")


def test_directory_named_like_an_image(tmp_path: Path) -> None:
    folder = tmp_path / "cat" / "train" / "good" / "x.png"
    folder.mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"x\.png is a folder, not an image"):
        load_image(folder)
    save(noise(SIZE, "RGB"), folder.parent / "y.png")
    assert [s.image.name for s in read_mvtec(tmp_path, "train")] == ["y.png"]  # a folder is not an image


def test_permission_denied_on_a_file_monkeypatched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(noise(SIZE, "RGB"), tmp_path / "locked.png")
    real_open = builtins.open

    def deny(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(DatasetError, match=r"cannot read image file .*locked\.png: permission denied"):
        load_image(path)
    sample = Sample(path, "c", 0, "good", None, "train")
    with pytest.raises(DatasetError, match=r"locked\.png: permission denied"):
        validate_samples([sample])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_on_a_file_real(tmp_path: Path) -> None:
    path = save(noise(SIZE, "RGB"), tmp_path / "locked.png")
    path.chmod(0)
    try:
        with pytest.raises(DatasetError, match=r"locked\.png: permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


# --------------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", GOOD_MASK_MODES)
def test_masks_of_any_mode_are_binarised(tmp_path: Path, mode: str) -> None:
    image = save(noise(SIZE, "RGB"), tmp_path / "img.png")
    mask_path = save(mask_image(SIZE, mode), tmp_path / f"m{mode.replace(';', '')}.png")
    mask = load_mask(mask_path, image, SIZE)
    expected = np.asarray(mask_image(SIZE, "L")) > 0
    np.testing.assert_array_equal(mask, expected)
    sample = Sample(image, "c", 1, "crack", mask_path, "test")
    assert validate_samples([sample]) == ([sample], [])


def test_mask_of_the_wrong_size_names_both_files(tmp_path: Path) -> None:
    image = save(noise(SIZE, "RGB"), tmp_path / "photo.png")
    mask_path = save(mask_image((SIZE[0], SIZE[1] + 2), "L"), tmp_path / "photo_mask.png")
    sample = Sample(image, "c", 1, "crack", mask_path, "test")
    with pytest.raises(DatasetError, match=r"mask .*photo_mask\.png is 12x12 pixels but image .*photo\.png is 12x10"):
        validate_samples([sample])


# --------------------------------------------------------------------------------------------------------------------
# validate_samples
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path: Path) -> list[Sample]:
    """12 training samples of category c: 0, 2, 4... good, odd ones bad (5 of them zero-byte, 1 text)."""
    samples = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.png"
        if i % 2 == 0:
            save(noise(SIZE, "RGB", i), path)
        else:
            write(path, b"" if i < 11 else b"text")
        samples.append(Sample(path, "c", 0, "good", None, "train"))
    return samples


def test_validate_error_lists_bad_files_and_count(mixed: list[Sample]) -> None:
    with pytest.raises(DatasetError) as error:
        validate_samples(mixed)
    message = str(error.value)
    assert message.startswith("6 of 12 samples cannot be used:")
    for i in (1, 3, 5, 7, 9, 11):
        assert f"{i:02d}.png" in message
    assert "data.skip_bad=true" in message


def test_validate_lists_at_most_ten(tmp_path: Path) -> None:
    samples = [Sample(write(tmp_path / f"{i:02d}.png", b""), "c", 0, "good", None, "test") for i in range(13)]
    with pytest.raises(DatasetError) as error:
        validate_samples(samples)
    message = str(error.value)
    assert message.count("\n  - ") == MAX_LISTED_PROBLEMS
    assert "... and 3 more" in message and message.startswith("13 of 13 samples")


def test_validate_skip_bad_one_warning_order_and_threads(mixed: list[Sample]) -> None:
    with capture() as caught:
        good, bad = validate_samples(mixed, skip_bad=True)
    assert good == mixed[0::2]
    assert [s for s, _ in bad] == mixed[1::2]
    assert all(s.image.name in reason for s, reason in bad)
    assert len(caught.messages) == 1 and "left out 6 of 12 samples" in caught.messages[0]
    with capture():
        assert validate_samples(mixed, skip_bad=True, threads=1) == (good, bad)
        assert validate_samples(list(reversed(mixed)), skip_bad=True, threads=3)[0] == list(reversed(good))
    with pytest.raises(ValueError, match="threads"):
        validate_samples(mixed, threads=0)


def test_validate_clean_and_empty(mixed: list[Sample]) -> None:
    clean = mixed[0::2]
    with capture() as caught:
        assert validate_samples(clean) == (clean, [])
        assert validate_samples(clean, skip_bad=True) == (clean, [])
        assert validate_samples([]) == ([], [])
    assert caught.messages == []


def test_validate_skip_bad_keeps_a_prompt_per_category(mixed: list[Sample], tmp_path: Path) -> None:
    lonely = Sample(write(tmp_path / "lonely.png", b""), "other", 0, "good", None, "train")
    with pytest.raises(DatasetError, match=r"every training image of category other is unusable"):
        validate_samples([*mixed, lonely], skip_bad=True)
    tests_only = [Sample(s.image, s.category, 0, "good", None, "test") for s in mixed[1::2]]
    with pytest.raises(DatasetError, match=r"all 6 samples are unusable"):
        validate_samples(tests_only, skip_bad=True)


def test_defective_sample_with_bad_mask_is_skipped_whole(tmp_path: Path) -> None:
    image = save(noise(SIZE, "RGB"), tmp_path / "d.png")
    other = save(noise(SIZE, "RGB", 1), tmp_path / "e.png")
    mask = write(tmp_path / "d_mask.png", truncated(encode(mask_image(SIZE, "L"), "PNG"), 0.5))
    samples = [Sample(image, "c", 1, "crack", mask, "test"), Sample(other, "c", 0, "good", None, "test")]
    with capture():
        good, bad = validate_samples(samples, skip_bad=True)
    assert good == samples[1:] and bad[0][0] == samples[0] and "d_mask.png" in bad[0][1]


# --------------------------------------------------------------------------------------------------------------------
# Folders: empty categories, one image, permissions, files where folders are expected, links, names
# --------------------------------------------------------------------------------------------------------------------


def test_category_without_training_images(tmp_path: Path) -> None:
    make_category(tmp_path, "bottle")
    empty = make_category(tmp_path, "screw", train=0)  # test images but an empty train/good
    (empty / "train" / "good").mkdir(parents=True)
    only_test = make_category(tmp_path, "nut", train=0)  # test images, no train folder at all
    for split in ("train", "test"):
        with pytest.raises(DatasetError) as error:
            read_mvtec(tmp_path, split)
        message = str(error.value)
        assert "2 of 3 categories" in message and "screw" in message and "nut" in message
        assert "train/good is empty" in message and "does not exist" in message and "data.skip_bad=true" in message
    with capture() as caught:
        samples = read_mvtec(tmp_path, "test", skip_bad=True)
    assert {s.category for s in samples} == {"bottle"}
    assert len(caught.messages) == 1 and "left out 2 of 3 categories" in caught.messages[0]
    assert str(only_test) in caught.messages[0]
    assert {s.category for s in read_mvtec(tmp_path, "test", categories=["bottle"])} == {"bottle"}  # not chosen: fine


def test_labelled_folders_need_no_training_images(tmp_path: Path) -> None:
    """A validation folder of labelled images only (onenip calibrate --val): test/ alone, and its format detected."""
    (make_category(tmp_path, "screw", train=0) / "train" / "good").mkdir(parents=True)
    make_category(tmp_path, "nut", train=0)
    with pytest.raises(DatasetError, match="has no training images"):
        read_sources([str(tmp_path)], "test")
    assert {s.category for s in read_sources([str(tmp_path)], "test", labelled_only=True)} == {"screw", "nut"}
    (tmp_path / "screw" / "train" / "good").rmdir()
    (tmp_path / "screw" / "train").rmdir()
    assert detect_format(tmp_path) == "mvtec"


def test_chosen_categories_skip_unusable_ones_of_several_roots(tmp_path: Path) -> None:
    """data.categories keeps a root's unusable categories out of the check, also across several roots."""
    make_category(tmp_path / "a", "bottle")
    (make_category(tmp_path / "a", "screw", train=0) / "train" / "good").mkdir(parents=True)
    make_category(tmp_path / "b", "nut")
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(DatasetError, match="screw has no training images"):
        read_sources(roots, "train")
    assert {s.category for s in read_sources(roots, "train", ["bottle", "nut"])} == {"bottle", "nut"}
    assert {s.category for s in read_sources(roots[:1], "train", ["bottle"])} == {"bottle"}
    with pytest.raises(DatasetError, match="unknown category bolt.*available: bottle, nut, screw"):
        read_sources(roots, "train", ["bottle", "bolt"])


def test_no_category_left_is_an_error_even_with_skip_bad(tmp_path: Path) -> None:
    (make_category(tmp_path, "screw", train=0) / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"screw has no training images"):
        read_mvtec(tmp_path, "train", skip_bad=True)


def test_btad_category_without_training_images(tmp_path: Path) -> None:
    save(noise(SIZE, "RGB"), tmp_path / "01" / "train" / "ok" / "0.bmp")
    save(noise(SIZE, "RGB"), tmp_path / "01" / "test" / "ok" / "1.bmp")
    save(noise(SIZE, "RGB"), tmp_path / "02" / "test" / "ok" / "1.bmp")
    with pytest.raises(DatasetError, match=r"BTAD category 02 has no training images"):
        read_btad(tmp_path, "test")
    with capture():
        assert {s.category for s in read_btad(tmp_path, "test", skip_bad=True)} == {"01"}


def test_category_with_one_image_is_its_own_prompt(tmp_path: Path) -> None:
    make_category(tmp_path, "single", train=1)
    train = read_mvtec(tmp_path, "train")
    assert len(train) == 1 and group_by_category(train) == {"single": train}
    test = read_mvtec(tmp_path, "test")
    assert validate_samples(train + test) == (train + test, [])


def test_file_where_a_folder_is_expected(tmp_path: Path) -> None:
    root_file = write(tmp_path / "root.png", b"")
    with pytest.raises(DatasetError, match=r"root\.png is not a folder"):
        read_mvtec(root_file, "train")
    make_category(tmp_path / "data", "bottle")
    write(tmp_path / "data" / "cable" / "train" / "good", b"a file")
    save(noise(SIZE, "RGB"), tmp_path / "data" / "cable" / "test" / "good" / "0.png")
    with pytest.raises(DatasetError, match=r"cable.train.good is not a folder"):
        read_mvtec(tmp_path / "data", "train")
    with pytest.raises(DatasetError, match=r"cable.train.good is not a folder"):
        read_source(str(tmp_path / "data"), "test")
    (tmp_path / "data" / "cable" / "train" / "good").unlink()
    (tmp_path / "data" / "cable" / "train").rmdir()
    write(tmp_path / "data" / "cable" / "train", b"a file")  # train itself a file: the category is still found
    with pytest.raises(DatasetError, match=r"cable.train.good is not a folder \(.*cable.train is a file\)"):
        read_mvtec(tmp_path / "data", "test")


def test_file_where_the_mask_folder_is_expected(tmp_path: Path) -> None:
    cat = make_category(tmp_path, "bottle")
    for folder in (cat / "ground_truth" / "crack", cat / "ground_truth"):
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()
        write(folder, b"a file")
        with pytest.raises(DatasetError, match=rf"mask folder .*ground_truth.crack is not a folder \(.*{folder.name} is a file\)"):
            read_mvtec(tmp_path, "test")
        folder.unlink()
        (cat / "ground_truth").mkdir(exist_ok=True)


def test_unreadable_training_folder_monkeypatched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_category(tmp_path, "bottle")
    locked = make_category(tmp_path, "screw") / "train" / "good"
    real_scandir = os.scandir

    def deny(path: Any = ".") -> Any:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deny)
    with pytest.raises(DatasetError, match=r"screw cannot be read: cannot list folder .*screw.train.good: permission denied"):
        read_mvtec(tmp_path, "train")
    with capture() as caught:
        assert {s.category for s in read_mvtec(tmp_path, "train", skip_bad=True)} == {"bottle"}
    assert len(caught.messages) == 1 and "screw" in caught.messages[0]


def test_unreadable_category_folder_monkeypatched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_category(tmp_path, "bottle")
    locked = make_category(tmp_path, "screw")
    real_stat = os.stat

    def deny(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", deny)
    with pytest.raises(DatasetError, match=r"category folder .*screw cannot be read"):
        read_mvtec(tmp_path, "train")
    assert {s.category for s in read_mvtec(tmp_path, "train", categories=["bottle"])} == {"bottle"}  # not chosen
    with capture() as caught:
        assert {s.category for s in read_mvtec(tmp_path, "test", skip_bad=True)} == {"bottle"}
    assert len(caught.messages) == 1


def test_unreadable_root_monkeypatched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_scandir = os.scandir
    monkeypatch.setattr(
        os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "denied")) if Path(p) == tmp_path else real_scandir(p)
    )
    with pytest.raises(DatasetError, match=r"cannot list folder .*: permission denied"):
        read_mvtec(tmp_path, "train")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root lists folders whatever their permissions")
def test_unreadable_folders_real(tmp_path: Path) -> None:
    make_category(tmp_path, "bottle")
    locked = make_category(tmp_path, "screw") / "train" / "good"
    locked.chmod(0)
    try:
        with pytest.raises(DatasetError, match=r"screw.train.good: permission denied"):
            read_mvtec(tmp_path, "train")
    finally:
        locked.chmod(0o755)
    whole = tmp_path / "screw"
    whole.chmod(0)
    try:
        with pytest.raises(DatasetError, match=r"category folder .*screw cannot be read"):
            read_mvtec(tmp_path, "train")
    finally:
        whole.chmod(0o755)


def test_broken_symbolic_links(tmp_path: Path) -> None:
    cat = make_category(tmp_path, "bottle", train=2)
    link = cat / "train" / "good" / "link.png"
    link.symlink_to(cat / "nowhere.png")
    mask_link = cat / "ground_truth" / "crack" / "200_mask.png"
    mask_link.unlink()
    mask_link.symlink_to(cat / "no-mask.png")
    samples = read_mvtec(tmp_path, "train") + read_mvtec(tmp_path, "test")
    assert link in {s.image for s in samples}, "a broken link is listed, to be reported, not dropped silently"
    with pytest.raises(DatasetError) as error:
        validate_samples(samples)
    assert f"image file {link} is a broken symbolic link" in str(error.value)
    assert f"mask file {mask_link} is a broken symbolic link" in str(error.value)
    with capture():
        good, bad = validate_samples(samples, skip_bad=True)
    assert {s.image.name for s, _ in bad} == {"link.png", "200.png"}


def test_symbolic_link_loop_is_reported(tmp_path: Path) -> None:
    cat = make_category(tmp_path, "bottle", train=1)
    loop = cat / "train" / "good" / "loop.png"
    loop.symlink_to(loop)
    samples = read_mvtec(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"loop\.png"):
        validate_samples(samples)


def test_visa_broken_link_names_the_link(tmp_path: Path) -> None:
    (tmp_path / "split_csv").mkdir()
    save(noise(SIZE, "RGB"), tmp_path / "c" / "ok.png")
    (tmp_path / "c" / "gone.png").symlink_to(tmp_path / "c" / "missing.png")
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\nc,train,normal,c/ok.png,\nc,train,normal,c/gone.png,\n"
    )
    with pytest.raises(DatasetError, match=r"gone\.png listed on line 3 .* is a broken symbolic link"):
        read_visa(tmp_path, "train")


@pytest.mark.parametrize(
    "category, stem",
    [("flasché", "ü"), ("瓶", "日本語の画像"), ("two words", "a b c"), (os.fsdecode(b"cat\xe9"), os.fsdecode(b"\xff\xfe"))],
)
def test_non_ascii_names_end_to_end(tmp_path: Path, category: str, stem: str) -> None:
    root = tmp_path / "données"
    image = save(noise(SIZE, "RGB"), root / category / "train" / "good" / f"{stem}.png")
    save(noise(SIZE, "RGB", 3), root / category / "test" / "défaut" / f"{stem}.png")
    mask = save(mask_image(SIZE, "L"), root / category / "ground_truth" / "défaut" / f"{stem}_mask.png")
    train = read_source(f"mvtec:{root}", "train")
    assert [s.image for s in train] == [image] and train[0].category == category
    test = read_mvtec(root, "test")
    assert test[0].mask == mask and test[0].defect == "défaut"
    good, bad = validate_samples(train + test)
    assert bad == [] and good == train + test
    pixels, pixel_mask = read_sample(test[0], 16)
    assert pixels.shape == (16, 16, 3) and pixel_mask is not None and pixel_mask.any()
    write(image, b"")
    with pytest.raises(DatasetError) as error:
        validate_samples(train)
    assert str(image) in str(error.value)


def test_ignored_entries_are_not_samples(tmp_path: Path) -> None:
    cat = make_category(tmp_path, "bottle", train=1)
    good = cat / "train" / "good"
    write(good / ".hidden.png", b"")
    write(good / "notes.txt", b"x")
    (good / "sub.jpg").mkdir()
    assert [s.image.name for s in read_mvtec(tmp_path, "train")] == ["000.png"]
