"""Reading images and masks from disk and resizing them to the square network input.

Every image becomes 8-bit RGB whatever its mode (grey, palette, alpha, CMYK, 16-bit, float); every mask becomes a
boolean array (pixel value > 0). Any file that cannot be opened or decoded raises
:class:`~onenip.errors.DatasetError` naming the file and the reason. Images are resized straight to a square (aspect
ratio not kept, no crop), as OneNIP does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from PIL import Image

from .datasets import Sample
from .errors import DatasetError

__all__ = ["load_image", "load_mask", "read_sample", "resize_image", "resize_mask"]

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
"""Pillow modes of unsigned 16-bit single-channel images."""
UINT8_MAX = 255
SIXTEEN_TO_EIGHT = 257.0
"""65535 / 255: dividing by it maps the full 16-bit range onto 0..255."""

_T = TypeVar("_T")
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------------------------------


def _open_decoded(path: PathLike, what: str, convert: Callable[[Image.Image], _T]) -> _T:
    """Open `path`, decode it fully and return ``convert(image)``; every failure becomes a DatasetError.

    Decoding the whole file (``load``) is what detects truncated files; ``Image.open`` only reads the header.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return convert(img)
    except FileNotFoundError as exc:
        raise DatasetError(f"{what} file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise DatasetError(f"{what} file {path} is a folder, not an image") from exc
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt data makes Pillow raise OSError, SyntaxError, struct.error...
        reason = str(exc) or "unknown error"
        raise DatasetError(f"cannot read {what} file {path}: {reason} ({type(exc).__name__})") from exc


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    """Values rounded to the nearest integer and clipped to 0..255, as uint8."""
    return np.clip(np.rint(values), 0, UINT8_MAX).astype(np.uint8)


def _deep_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
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


def _to_rgb(img: Image.Image) -> Image.Image:
    """`img` as a new 8-bit RGB image; alpha is dropped, grey is replicated over the three channels."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        grey = _deep_to_uint8(np.asarray(img), img.mode)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def load_image(path: PathLike) -> Image.Image:
    """The image at `path`, fully decoded, as an 8-bit RGB Pillow image.

    Grey (``L``, ``1``), palette, ``LA``, ``RGBA`` (alpha dropped, not composited), ``CMYK``, 16-bit and float images
    are converted; see :func:`_deep_to_uint8` for how deep images are scaled. EXIF orientation is not applied, so
    the pixels line up with masks drawn on the stored image.

    Raises:
        DatasetError: the file is missing, not an image, truncated or otherwise undecodable (naming it and why).
    """
    return _open_decoded(path, "image", _to_rgb)


def resize_image(img: Image.Image, size: int) -> np.ndarray:
    """`img` resized straight to ``size`` x ``size`` (aspect ratio not kept, no crop), as uint8 (size, size, 3).

    Uses Pillow's bilinear filter, which antialiases when shrinking. Non-RGB images are converted first.
    """
    _check_size(size)
    rgb = img if img.mode == "RGB" else _to_rgb(img)
    resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


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
