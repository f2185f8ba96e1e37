"""Reading images and masks and resizing them to the square network input.

Every image becomes 8-bit RGB whatever its mode (grey, palette, alpha, CMYK, 16-bit, float); every mask becomes a
boolean array (pixel value > 0). Images are read from a path, or from data in memory (bytes or a binary stream: an
upload, see :func:`load_image`) with the same checks. Anything that cannot be opened or decoded raises
:class:`~onenip.errors.DatasetError` naming the file (or the in-memory data's name) and the reason. Images are resized
straight to a square (aspect ratio not kept, no crop), as OneNIP does; :func:`load_batch` makes the deployed model's
uint8 input batch.

Decompression bombs: onenip applies its own limit, :data:`MAX_PIXELS`, to the size a file's header claims, before any
pixel is decoded, and reports a larger file as a DatasetError. Pillow's own check (``Image.MAX_IMAGE_PIXELS``, whose
``DecompressionBombWarning`` and ``DecompressionBombError`` would otherwise leak out) is aligned with that limit and
silenced while onenip opens a file; see :func:`_pillow_guard`. A larger image raises :class:`TooManyPixelsError`.
Truncated files are always errors: onenip never sets ``ImageFile.LOAD_TRUNCATED_IMAGES``.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image

from onenip.data.files import Sample
from onenip.errors import DatasetError

__all__ = ["MAX_PIXELS", "ImageSource", "TooManyPixelsError", "UnacceptedFormatError", "load_batch", "load_image",
           "load_mask", "read_sample", "resize_image", "resize_mask"]

MAX_PIXELS: int = 100_000_000
"""Most pixels (width x height, as the file's header claims) an image or mask may have.

Checked before the pixels are decoded, so a corrupt or malicious header cannot make onenip allocate gigabytes. 100 M
pixels is ten times a 10-megapixel photograph and ~100 times an MVTec AD image. Read at every call, so it can be
changed at run time (``onenip.data.images.MAX_PIXELS = ...``).
"""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
"""Pillow modes of unsigned 16-bit single-channel images."""
UINT8_MAX = 255
SIXTEEN_TO_EIGHT = 257.0
"""65535 / 255: dividing by it maps the full 16-bit range onto 0..255."""

_T = TypeVar("_T")
PathLike = str | os.PathLike[str]
ImageSource = PathLike | bytes | bytearray | memoryview | BinaryIO
"""What :func:`load_image` reads: a path, or the encoded image in memory (bytes, or a binary stream)."""


class TooManyPixelsError(DatasetError):
    """An image or mask with more than :data:`MAX_PIXELS` pixels (as its header claims, or as Pillow finds decoding)."""


class UnacceptedFormatError(DatasetError):
    """An image of a format the caller does not accept (see the `formats` of :func:`load_image`)."""


# --------------------------------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------------------------------


_PILLOW_LOCK = threading.Lock()
"""Serialises :func:`_pillow_guard`: warning filters and ``Image.MAX_IMAGE_PIXELS`` are process-wide."""

_LOAD_WITHOUT_BOMB_CHECK = frozenset({"PNG", "JPEG", "BMP"})
"""Pillow formats whose ``load()`` never calls Pillow's decompression-bomb check (it runs only in ``Image.open``), so
they can be decoded outside :func:`_pillow_guard`, in parallel. Other formats (TIFF tiles, GIF frames...) check again
while decoding and are loaded inside the guard."""

_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")


@contextmanager
def _pillow_guard(bomb_warning: str) -> Iterator[None]:
    """While Pillow reads a file: its bomb limit is :data:`MAX_PIXELS` and its bomb warning is `bomb_warning`.

    `bomb_warning` is a :mod:`warnings` action: ``"ignore"`` while reading a header (onenip then checks the size
    itself and names it), ``"error"`` while decoding (a frame or tile larger than the limit becomes an exception,
    reported as a DatasetError). Pillow then raises ``DecompressionBombError`` only above twice the limit, which is
    caught and reported too. The global state touched here is restored on exit; a lock keeps onenip's own threads from
    interleaving (other threads of the process may see the temporary values for the few milliseconds it lasts).
    """
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.simplefilter(bomb_warning, Image.DecompressionBombWarning)  # type: ignore[arg-type]
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _too_large(label: str, size: str) -> TooManyPixelsError:
    return TooManyPixelsError(
        f"{label}: {size} pixels is more than the limit of {MAX_PIXELS:,} pixels (onenip.data.images.MAX_PIXELS); "
        "the image is corrupt, or too large to decode safely"
    )


def _check_header_size(img: Image.Image, label: str) -> None:
    """Raise unless the size in the header of `img` (named `label` in errors) is at least 1x1 and at most
    :data:`MAX_PIXELS` pixels."""
    width, height = img.size
    if width < 1 or height < 1:
        raise DatasetError(f"{label} is {width}x{height} pixels: an image must have at least one pixel")
    if width * height > MAX_PIXELS:
        raise _too_large(label, f"{width}x{height}")


def _bomb_error(exc: Exception, label: str) -> TooManyPixelsError:
    """Pillow's DecompressionBombError / DecompressionBombWarning as a TooManyPixelsError naming the source (a file or an upload)."""
    found = _PILLOW_PIXELS.search(str(exc))
    return _too_large(label, f"{int(found.group(1)):,}" if found else "its size in")


def _is_empty(source: PathLike | BinaryIO) -> bool:
    """Whether the file at `source`, or the seekable stream `source` (read from its start, as Pillow reads it), holds
    no byte."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source) == 0
        source.seek(0)
        return not source.read(1)
    except OSError:
        return False


def _unidentified(source: PathLike | BinaryIO, label: str, formats: Sequence[str] | None) -> DatasetError:
    """The error for `source` (named `label`), which Pillow could not identify when it tried `formats` (all when
    None): empty, of a format not among `formats` (UnacceptedFormatError), or not a format Pillow reads."""
    kind = "file" if isinstance(source, (str, os.PathLike)) else "data"
    if _is_empty(source):
        return DatasetError(f"cannot read {label}: cannot identify image file (the {kind} is empty: 0 bytes)")
    found = _format_of(source) if formats is not None else None
    if found is not None:
        return UnacceptedFormatError(f"cannot read {label}: {found} images are not accepted here (accepted: "
                                     f"{', '.join(formats or ())})")
    return DatasetError(f"cannot read {label}: cannot identify image file (not an image, or a format Pillow cannot read)")


def _format_of(source: PathLike | BinaryIO) -> str | None:
    """The format Pillow takes `source` for, from its header alone (nothing is decoded), or None."""
    try:
        with _pillow_guard("ignore"), Image.open(source) as img:
            return str(img.format or "") or None
    except Exception:  # noqa: BLE001 - not an image Pillow knows (or too large: the format is all that is asked)
        return None


def _missing_reason(path: PathLike, what: str) -> str:
    """Message for a file that does not exist; names the target of a broken symbolic link."""
    if os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"{what} file {path} is a broken symbolic link (its target {target} does not exist)"
    return f"{what} file {path} does not exist"


def _label(source: ImageSource, what: str, name: str | None) -> str:
    """How errors name `source`: "image file PATH", or for data in memory "image NAME" (`name`, else the stream's own
    name, else "<bytes>" / "<stream>"). TypeError for what is neither a path, nor bytes, nor a binary stream."""
    if isinstance(source, (str, os.PathLike)):
        return f"{what} file {source}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{what} {name or '<bytes>'}"
    if not callable(getattr(source, "read", None)):
        raise TypeError(f"cannot read {what} data from {type(source).__name__}: give a path, bytes or a binary stream")
    return f"{what} {name or getattr(source, 'name', None) or '<stream>'}"


def _seekable(source: ImageSource) -> PathLike | BinaryIO:
    """What Pillow opens for `source`: a path as it is, bytes and a stream that cannot seek as an in-memory stream."""
    if isinstance(source, (str, os.PathLike)):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    seekable = getattr(source, "seekable", None)
    return source if seekable is not None and seekable() else io.BytesIO(source.read())


def _open_decoded(source: ImageSource, what: str, convert: Callable[[Image.Image], _T], name: str | None = None,
                  formats: Sequence[str] | None = None) -> _T:
    """Open `source` (a path, bytes or a binary stream; only with the Pillow `formats` given, if any), decode it fully
    and return ``convert(image)``; every failure becomes a DatasetError naming the source (see `_label`).

    The header size is checked against :data:`MAX_PIXELS` before decoding. Decoding the whole file (``load``) is
    what detects truncated files; ``Image.open`` only reads the header.
    """
    label = _label(source, what, name)
    fp = _seekable(source)  # a stream that fails to read is the caller's error, not the image's: raised as it is
    try:
        with _pillow_guard("ignore"):
            img = Image.open(fp, formats=None if formats is None else list(formats))
        with img:
            _check_header_size(img, label)
            if img.format in _LOAD_WITHOUT_BOMB_CHECK:
                img.load()
            else:
                with _pillow_guard("error"):
                    img.load()
            return convert(img)
    except FileNotFoundError as exc:
        raise DatasetError(_missing_reason(source, what) if isinstance(source, (str, os.PathLike)) else
                           f"cannot read {label}: {exc}") from exc
    except IsADirectoryError as exc:
        raise DatasetError(f"{label} is a folder, not an image") from exc
    except PermissionError as exc:
        raise DatasetError(f"cannot read {label}: permission denied") from exc
    except DatasetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, label) from exc
    except Image.UnidentifiedImageError as exc:
        raise _unidentified(fp, label, formats) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt data makes Pillow raise OSError, SyntaxError, struct.error...
        reason = str(exc) or "unknown error"
        raise DatasetError(f"cannot read {label}: {reason} ({type(exc).__name__})") from exc


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    """Values rounded to the nearest integer and clipped to 0..255, as uint8."""
    return np.clip(np.rint(values), 0, UINT8_MAX).astype(np.uint8)


def deep_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """A single-channel 16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) array as uint8.

    16-bit data is scaled from 0..65535 to 0..255 (value / 257, rounded). ``I`` data is taken as 16-bit when its
    maximum exceeds 255, else as 8-bit. ``F`` data is taken as 0..1 when its maximum is at most 1, as 8-bit when at
    most 255, else as 16-bit; NaN becomes 0.
    """
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=np.finfo(np.float64).max, neginf=0.0)
    peak = float(data.max(initial=0.0))
    if mode == "F" and peak <= 1.0:
        return _round_to_uint8(data * UINT8_MAX)
    if mode in SIXTEEN_BIT_MODES or peak > UINT8_MAX:
        return _round_to_uint8(data / SIXTEEN_TO_EIGHT)
    return _round_to_uint8(data)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as a new 8-bit RGB image; alpha is dropped, grey is replicated over the three channels."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        grey = deep_to_uint8(np.asarray(img), img.mode)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, name: str | None = None, formats: Sequence[str] | None = None) -> Image.Image:
    """The image at the path `source`, or encoded in the bytes or binary stream `source` (an upload; a stream is read
    from its start), fully decoded, as an 8-bit RGB Pillow image.

    Grey (``L``, ``1``), palette, ``LA``, ``RGBA`` (alpha dropped, not composited), ``CMYK``, 16-bit and float images
    are converted; see :func:`deep_to_uint8` for how deep images are scaled. EXIF orientation is not applied, so
    the pixels line up with masks drawn on the stored image. A path and data in memory get the same checks.

    Args:
        source: a path, or the encoded image as bytes / bytearray / memoryview or a binary stream.
        name: how errors name data in memory ("image NAME", e.g. an upload's file name); default: the stream's
            ``name``, else ``<bytes>`` / ``<stream>``. A path names itself ("image file PATH").
        formats: the Pillow formats accepted (e.g. ``("PNG", "JPEG")``); only their decoders see the data.
            Default: every format Pillow reads.

    Raises:
        TooManyPixelsError: more than :data:`MAX_PIXELS` pixels (a DatasetError).
        UnacceptedFormatError: an image of a format not among `formats` (a DatasetError), naming its format.
        DatasetError: the file is missing, or the data is empty, not an image, truncated or otherwise undecodable
            (naming the source and why).
        TypeError: `source` is none of the above.
    """
    return _open_decoded(source, "image", to_rgb, name, formats)


def resize_image(img: Image.Image, size: int) -> np.ndarray:
    """`img` resized straight to ``size`` x ``size`` (aspect ratio not kept, no crop), as uint8 (size, size, 3).

    Uses Pillow's bilinear filter, which antialiases when shrinking. Non-RGB images are converted first.
    """
    _check_size(size)
    rgb = img if img.mode == "RGB" else to_rgb(img)
    resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


def load_batch(images: Sequence[ImageSource | Image.Image], size: int) -> np.ndarray:
    """Images (Pillow images, or anything :func:`load_image` reads) each resized by :func:`resize_image`, in order,
    as the deployed model's input: uint8 (N, 3, size, size).

    The array is a channels-first view of channels-last memory (the (N, size, size, 3) stack of the images, not
    copied): PyTorch's CPU convolutions run faster on it than on the standard layout, to the same values; the
    exported runtimes take any layout (``np.ascontiguousarray`` gives the standard one).

    Raises:
        DatasetError: an image cannot be read (naming it).
        ValueError: `size` is not a positive integer.
    """
    _check_size(size)
    return as_batch([resize_image(item if isinstance(item, Image.Image) else load_image(item), size) for item in images],
                    size)


def as_batch(pixels: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Images already resized by :func:`resize_image` (uint8 (size, size, 3) each), in order, as the deployed model's
    input: uint8 (N, 3, size, size), the channels-first view of their channels-last stack (see :func:`load_batch`)."""
    stacked = np.stack(pixels) if len(pixels) else np.empty((0, size, size, 3), dtype=np.uint8)  # (N, size, size, 3)
    return stacked.transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------------


def _palette_foreground(img: Image.Image) -> np.ndarray:
    """Foreground of a palette mask: pixels whose palette colour is not black.

    Going through the colours, not the indices, keeps masks whose palette puts white first right; an index beyond
    the stored palette counts as foreground.
    """
    indices = np.asarray(img.getchannel(0) if img.mode == "PA" else img)
    palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    lookup = np.ones(256, dtype=bool)
    lookup[: len(palette)] = palette.any(axis=1)
    return lookup[indices]


def _mask_array(img: Image.Image) -> np.ndarray:
    """`img` binarised as value > 0 (any colour channel > 0; alpha ignored), bool (H, W)."""
    if img.mode in ("P", "PA"):
        return _palette_foreground(img)
    if img.mode in ("LA", "La"):
        img = img.getchannel("L")
    elif img.mode not in ("1", "L", "I", "F", "RGB") and img.mode not in SIXTEEN_BIT_MODES:
        img = img.convert("RGB")
    values = np.nan_to_num(np.asarray(img), nan=0)
    if values.ndim == 3:
        return np.asarray(values > 0).any(axis=2)
    return np.asarray(values > 0)


def load_mask(
    path: PathLike, image_path: PathLike | None = None, image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """The mask at `path` as bool (H, W), True where the pixel value is > 0.

    Any mode is accepted (``1``, ``L``, ``P``, ``RGB``, ``I;16``...); VisA masks holding small integers (1, 2) are
    foreground wherever non-zero. When `image_size` (width, height) is given, the mask must have that size.

    Raises:
        DatasetError: the mask cannot be read, or its size differs from `image_size` (naming both files and sizes).
    """
    mask = _open_decoded(path, "mask", _mask_array)
    if image_size is not None:
        _check_mask_size(mask, path, image_path, image_size)
    return mask


def _check_mask_size(
    mask: np.ndarray, path: PathLike, image_path: PathLike | None, image_size: tuple[int, int]
) -> None:
    """Raise unless `mask` (H, W) has the size `image_size` (W, H) of its image."""
    height, width = mask.shape
    if (width, height) != tuple(image_size):
        image = f"image {image_path}" if image_path is not None else "its image"
        raise DatasetError(
            f"mask {path} is {width}x{height} pixels but {image} is {image_size[0]}x{image_size[1]}; "
            "a mask must have the size of its image"
        )


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 2-D boolean mask resized to ``size`` x ``size`` with nearest neighbour, bool (size, size)."""
    _check_size(size)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    grey = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * UINT8_MAX)
    return np.asarray(grey.resize((size, size), Image.Resampling.NEAREST)) > 0


# --------------------------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------------------------


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")


def read_sample(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The image of `sample` as uint8 (size, size, 3) and its mask as bool (size, size).

    The mask is checked against the original image size before both are resized. A normal sample without a mask
    gets an all-False mask; a defective sample without a mask gets None (its pixels are unknown).

    Raises:
        DatasetError: the image or mask cannot be read, or their sizes differ.
    """
    img = load_image(sample.image)
    pixels = resize_image(img, size)
    if sample.mask is not None:
        mask = load_mask(sample.mask, sample.image, img.size)
        return pixels, resize_mask(mask, size)
    if sample.label == 0:
        return pixels, np.zeros((size, size), dtype=bool)
    return pixels, None
