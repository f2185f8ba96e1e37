"""Pseudo-anomaly synthesis for the supervised refiner (method §3).

Three kinds of synthetic anomaly are produced on an RGB uint8 image that has already been resized to the input size,
so every mask is at input resolution:

* **CutPaste-normal**: a colour-jittered rectangle cut from the image is pasted elsewhere in it.
* **CutPaste-scar**: a thin jittered strip is rotated (with ``expand=True``) and pasted with its alpha channel.
* **Perlin + texture**: a thresholded, slightly rotated 2-D Perlin noise map selects where an augmented texture image
  is blended into the image.

`synthesize` picks one of them in the paper's *hybrid* mode (CutPaste with probability ``cfg.cutpaste_prob``, split
evenly between normal and scar; Perlin otherwise). Every function takes an explicit `numpy.random.Generator` and draws
all of its randomness from it (no global ``random``, ``np.random`` or torch RNG), so a sample is reproducible from a
seed. Inputs are never modified in place. Every function returns ``(image, mask)``: a new uint8 ``(H, W, 3)`` image and
a uint8 ``(H, W)`` mask with values in {0, 1}.

This is an independent implementation written from the method description; it does not reproduce the imgaug/OpenCV
pipeline bit for bit: textures are RGB (the authors' are BGR), and OpenCV's bilinear resize and colour conversions
(`onenip.colorspaces`) are emulated in numpy and torch, mostly within a grey level or two of OpenCV 4.6's (measured
in tests/test_colorspaces.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageOps

from onenip.config import TEXTURE_RESIZES, SynthesisConfig
from onenip.errors import DatasetError
from onenip.synthesis import colorspaces

__all__ = [
    "IMAGE_SUFFIXES",
    "TextureSource",
    "FolderTextures",
    "ArrayTextures",
    "resize_bilinear",
    "resize_texture",
    "color_jitter",
    "cutpaste_normal",
    "cutpaste_scar",
    "perlin_noise",
    "perlin_mask",
    "AUGMENTER_NAMES",
    "augment_texture",
    "PerlinPaste",
    "perlin_paste_details",
    "perlin_paste",
    "SynthesisKind",
    "Synthesis",
    "synthesize_details",
    "synthesize",
]

#: File suffixes (lower case) that `FolderTextures` accepts.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

SynthesisKind = Literal["normal", "scar", "perlin"]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray, name: str = "image") -> None:
    """Raise ValueError unless `image` is a uint8 (H, W, 3) array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{name} must be a uint8 array of shape (H, W, 3), got shape {shape} and dtype {dtype}")


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weights of i1 for each of `n_out` outputs, as OpenCV's INTER_LINEAR samples.

    Pixel centres are aligned (source x = (x + 0.5) * n_in / n_out - 0.5) and only the two nearest source pixels are
    read, whatever the scale: no antialiasing filter. Positions outside the image take the edge pixel.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0
    frac[i0 < 0] = 0.0
    frac[i0 >= n_in - 1] = 0.0
    i0 = np.clip(i0, 0, n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), frac


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A uint8 (H, W, C) image resized to (height, width) like ``cv2.resize(..., INTER_LINEAR)`` (method §3).

    The authors' code resizes textures with OpenCV, which interpolates between the two nearest pixels per axis with
    no antialiasing, so a texture shrunk by more than 2x keeps its fine (aliased) detail; PIL's bilinear filter would
    average it away. Rounded to nearest; OpenCV's fixed-point arithmetic can differ by one grey level.
    """
    h_in, w_in = image.shape[:2]
    if (h_in, w_in) == (height, width):
        return image.copy()
    y0, y1, fy = _linear_taps(h_in, height)
    x0, x1, fx = _linear_taps(w_in, width)
    img = image.astype(np.float64)
    rows = img[y0] * (1.0 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    out = rows[:, x0] * (1.0 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_resize(method: str) -> None:
    if method not in TEXTURE_RESIZES:
        raise ValueError(f"texture resize method must be one of {', '.join(TEXTURE_RESIZES)}, got {method!r}")


def resize_texture(image: np.ndarray, width: int, height: int, method: str = "opencv") -> np.ndarray:
    """A uint8 (H, W, 3) texture resized to (height, width) by `method` (``synthesis.texture_resize``): "opencv"
    (`resize_bilinear`, the authors' way) or "antialias" (PIL's bilinear filter, whose support widens by the shrink
    factor, so shrunk textures lose their finest detail)."""
    _check_resize(method)
    if method == "opencv":
        return resize_bilinear(image, width, height)
    if image.shape[:2] == (height, width):
        return image.copy()
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))  # writable


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


# --------------------------------------------------------------------------------------------------------------------
# Texture sources
# --------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class TextureSource(Protocol):
    """Anything that yields a random RGB texture image of a requested square size."""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A random texture as a uint8 (size, size, 3) RGB array."""
        ...


class FolderTextures:
    """Texture images found recursively under a folder (e.g. DTD's ``images/``).

    Files with suffixes in `IMAGE_SUFFIXES` (any case) are listed once, sorted, so the texture drawn for a given
    generator state does not depend on the file system's listing order. Images are decoded on demand, at full size,
    and resized by `resize` (see `resize_texture`).
    """

    def __init__(self, root: str | Path, resize: str = "opencv") -> None:
        """List the images under `root`; raise `DatasetError` naming the folder when there are none."""
        _check_resize(resize)
        self.resize = resize
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"texture folder {self.root} does not exist or is not a folder")
        self.files: list[Path] = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise DatasetError(
                f"texture folder {self.root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, size: int) -> np.ndarray:
        """The `index`-th texture file as a uint8 (size, size, 3) RGB array (`resize_texture`)."""
        path = self.files[index]
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))  # full size: a reduced-scale JPEG decode would smooth it
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read texture image {path}: {exc}") from None
        return resize_texture(rgb, size, size, self.resize)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A uniformly drawn texture file, RGB, resized to size x size."""
        return self.load(int(rng.integers(len(self.files))), size)


class ArrayTextures:
    """Textures from in-memory images (e.g. other training images when no texture folder is configured)."""

    def __init__(self, images: Sequence[np.ndarray], resize: str = "opencv") -> None:
        """Keep references to `images` (uint8 (H, W, 3) RGB arrays of any size); they are never modified. `resize`:
        see `resize_texture`."""
        if len(images) == 0:
            raise DatasetError("ArrayTextures needs at least one image")
        for i, im in enumerate(images):
            _check_image(im, f"texture image {i}")
        _check_resize(resize)
        self.resize = resize
        self.images: list[np.ndarray] = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A uniformly drawn image as a new uint8 (size, size, 3) array (`resize_texture` when needed)."""
        return resize_texture(self.images[int(rng.integers(len(self.images)))], size, size, self.resize)


# --------------------------------------------------------------------------------------------------------------------
# CutPaste
# --------------------------------------------------------------------------------------------------------------------


def color_jitter(patch: np.ndarray, rng: np.random.Generator, jitter: Sequence[float]) -> np.ndarray:
    """Colour jitter of a uint8 RGB patch, drawn like torchvision's ``ColorJitter``.

    `jitter` is ``(brightness, contrast, saturation, hue)``. The order of the four adjustments is a random permutation,
    then the factors are drawn: brightness/contrast/saturation ~ U(max(0, 1 - x), 1 + x), hue ~ U(-h, h). An
    adjustment whose parameter is 0 is skipped (its factor is still drawn, keeping the stream of draws fixed).
    """
    b, c, s, h = (float(v) for v in jitter)
    order = rng.permutation(4)
    fb = _uniform(rng, max(0.0, 1.0 - b), 1.0 + b)
    fc = _uniform(rng, max(0.0, 1.0 - c), 1.0 + c)
    fs = _uniform(rng, max(0.0, 1.0 - s), 1.0 + s)
    fh = _uniform(rng, -h, h)
    pil = Image.fromarray(np.ascontiguousarray(patch))
    for idx in order:
        if idx == 0 and b > 0:
            pil = TF.adjust_brightness(pil, fb)
        elif idx == 1 and c > 0:
            pil = TF.adjust_contrast(pil, fc)
        elif idx == 2 and s > 0:
            pil = TF.adjust_saturation(pil, fs)
        elif idx == 3 and h > 0:
            pil = TF.adjust_hue(pil, fh)
    return np.asarray(pil, dtype=np.uint8)


def _cut_jittered(
    image: np.ndarray, rng: np.random.Generator, cfg: SynthesisConfig, ph: int, pw: int
) -> np.ndarray:
    """A (ph, pw, 3) crop from a uniform valid location of `image`, colour-jittered."""
    height, width = image.shape[:2]
    y = int(rng.integers(0, height - ph + 1))
    x = int(rng.integers(0, width - pw + 1))
    return color_jitter(image[y : y + ph, x : x + pw], rng, cfg.jitter)


def cutpaste_normal(
    image: np.ndarray, rng: np.random.Generator, cfg: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-normal: paste a jittered rectangle of the image at an independent uniform location.

    Area fraction ~ U(cfg.cutpaste_area); aspect ratio drawn with equal chance from U(low, 1) or U(1, high) of
    cfg.cutpaste_aspect; patch width int(sqrt(area * aspect)), height int(sqrt(area / aspect)), clipped to [1, size].
    Returns the new image and the mask (1 on the pasted rectangle).
    """
    _check_image(image)
    height, width = image.shape[:2]
    area = _uniform(rng, *cfg.cutpaste_area) * height * width
    low, high = cfg.cutpaste_aspect
    aspect = _uniform(rng, low, 1.0) if rng.random() < 0.5 else _uniform(rng, 1.0, high)
    pw = min(max(int(math.sqrt(area * aspect)), 1), width)
    ph = min(max(int(math.sqrt(area / aspect)), 1), height)
    patch = _cut_jittered(image, rng, cfg, ph, pw)
    y = int(rng.integers(0, height - ph + 1))
    x = int(rng.integers(0, width - pw + 1))
    out = image.copy()
    out[y : y + ph, x : x + pw] = patch
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + ph, x : x + pw] = 1
    return out, mask


def cutpaste_scar(
    image: np.ndarray, rng: np.random.Generator, cfg: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-scar: a thin jittered strip, rotated with ``expand=True``, pasted with its alpha channel.

    width ~ randint(cfg.scar_width) and length ~ randint(cfg.scar_length), both inclusive (patch width and height,
    clipped to the image). The RGBA strip is rotated by U(-cfg.scar_rotation, +cfg.scar_rotation) degrees (nearest) and
    its top-left corner is placed at a location drawn from the *pre-rotation* bounds, so the expanded patch may overhang
    the right/bottom border, where it is clipped. Mask = 1 where the pasted alpha is > 0.
    """
    _check_image(image)
    height, width = image.shape[:2]
    pw = min(int(rng.integers(cfg.scar_width[0], cfg.scar_width[1] + 1)), width)
    ph = min(int(rng.integers(cfg.scar_length[0], cfg.scar_length[1] + 1)), height)
    patch = _cut_jittered(image, rng, cfg, ph, pw)
    angle = _uniform(rng, -cfg.scar_rotation, cfg.scar_rotation)
    rgba = np.concatenate([patch, np.full((ph, pw, 1), 255, np.uint8)], axis=2)
    rotated = np.asarray(
        Image.fromarray(rgba).rotate(angle, resample=Image.Resampling.NEAREST, expand=True), dtype=np.uint8
    )
    y = int(rng.integers(0, height - ph + 1))
    x = int(rng.integers(0, width - pw + 1))
    rh = min(rotated.shape[0], height - y)
    rw = min(rotated.shape[1], width - x)
    rotated = rotated[:rh, :rw]
    alpha = rotated[..., 3].astype(np.float32)[..., None] / 255.0
    out = image.copy()
    region = out[y : y + rh, x : x + rw].astype(np.float32)
    # Alpha is 0 or 255 after a nearest rotation; the general blend keeps unmasked pixels bit-identical anyway.
    blended = rotated[..., :3].astype(np.float32) * alpha + region * (1.0 - alpha)
    inside = rotated[..., 3] > 0
    region_u8 = out[y : y + rh, x : x + rw]
    region_u8[inside] = np.clip(np.rint(blended[inside]), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + rh, x : x + rw] = inside
    return out, mask


# --------------------------------------------------------------------------------------------------------------------
# Perlin noise
# --------------------------------------------------------------------------------------------------------------------


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic smoothstep 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of `shape` with `res` = (cells along y, cells along x), as float32 in [-1, 1].

    Random unit gradients sit on the (res_y + 1) x (res_x + 1) lattice; each pixel interpolates the four corner dot
    products with the quintic fade curve, scaled by sqrt(2) so the range is about [-1, 1]. When the shape is not a
    multiple of `res`, the noise is computed on the next larger multiple and cropped (top-left). Fully vectorised.
    """
    height, width = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if height < 1 or width < 1 or ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise needs a positive shape and resolution, got shape={shape} res={res}")
    cy, cx = -(-height // ry), -(-width // rx)  # cell size in pixels (ceil)
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    # Gradients repeated to pixel resolution; the four corners of every pixel's cell are shifted views of it.
    gy = np.repeat(np.repeat(np.sin(angles).astype(np.float32), cy, axis=0), cx, axis=1)
    gx = np.repeat(np.repeat(np.cos(angles).astype(np.float32), cy, axis=0), cx, axis=1)
    fy = ((np.arange(height) % cy) / cy).astype(np.float32)[:, None]  # (H, 1) position inside the cell
    fx = ((np.arange(width) % cx) / cx).astype(np.float32)[None, :]  # (1, W)

    def corner(oy: int, ox: int) -> np.ndarray:
        sl = (slice(oy, oy + height), slice(ox, ox + width))
        return gy[sl] * (fy - (1.0 if oy else 0.0)) + gx[sl] * (fx - (1.0 if ox else 0.0))

    n00, n01, n10, n11 = corner(0, 0), corner(0, cx), corner(cy, 0), corner(cy, cx)
    ty, tx = _fade(fy), _fade(fx)
    top = n00 + tx * (n01 - n00)
    bottom = n10 + tx * (n11 - n10)
    noise = np.float32(math.sqrt(2.0)) * (top + ty * (bottom - top))
    return np.clip(noise, -1.0, 1.0).astype(np.float32)


def _rotate_noise(noise: np.ndarray, angle: float, fill: float) -> np.ndarray:
    """Rotate a float32 map about its centre by `angle` degrees (bilinear, same shape, `fill` outside)."""
    img = Image.fromarray(np.ascontiguousarray(noise, dtype=np.float32))  # mode "F"
    rotated = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)
    return np.asarray(rotated, dtype=np.float32).copy()


def _perlin_res(rng: np.random.Generator, cfg: SynthesisConfig) -> tuple[int, int]:
    lo, hi = cfg.perlin_scale
    return 2 ** int(rng.integers(lo, hi + 1)), 2 ** int(rng.integers(lo, hi + 1))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, cfg: SynthesisConfig) -> np.ndarray:
    """Boolean anomaly mask: Perlin noise at resolution (2^a, 2^b), a and b independent integers in
    cfg.perlin_scale (inclusive), rotated by U(-cfg.perlin_rotation, +cfg.perlin_rotation) degrees (bilinear; the
    uncovered corners are filled with a value below the threshold), thresholded at ``> cfg.perlin_threshold``."""
    noise = perlin_noise(shape, _perlin_res(rng, cfg), rng)
    angle = _uniform(rng, -cfg.perlin_rotation, cfg.perlin_rotation)
    fill = min(0.0, cfg.perlin_threshold - 1.0)
    return _rotate_noise(noise, angle, fill) > cfg.perlin_threshold


# --------------------------------------------------------------------------------------------------------------------
# Texture augmentation (3 of 10 augmenters)
# --------------------------------------------------------------------------------------------------------------------


def _from_mode(arr: np.ndarray, mode: str) -> Image.Image:
    """A 3-channel PIL image in `mode` (e.g. YCbCr, HSV) from a uint8 (H, W, 3) array."""
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)[img]


def _aug_gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma contrast, gamma ~ U(0.5, 2.0) drawn per channel."""
    gammas = rng.uniform(0.5, 2.0, size=3)
    base = np.arange(256, dtype=np.float64) / 255.0
    out = np.empty_like(img)
    for ch in range(3):
        out[..., ch] = _lut(img[..., ch], 255.0 * base ** gammas[ch])
    return out


def _aug_brightness(
    img: np.ndarray, rng: np.random.Generator, spaces: Sequence[str] = colorspaces.SPACES
) -> np.ndarray:
    """imgaug's MultiplyAndAddToBrightness: in one of `spaces` (uniform; imgaug's: all six), multiply the brightness
    channel by U(0.8, 1.2) and add an integer U{-30..30}, in a random order (`colorspaces.brightness`, OpenCV's
    conversions)."""
    space = colorspaces.SPACES.index(spaces[int(rng.integers(len(spaces)))])
    mul = float(rng.uniform(0.8, 1.2))
    add = float(rng.integers(-30, 31))
    add_first = bool(rng.random() < 0.5)
    x = torch.tensor(img).permute(2, 0, 1).unsqueeze(0).float()
    out = colorspaces.brightness(x, torch.tensor([space]), torch.tensor([mul]), torch.tensor([add]),
                                 torch.tensor([add_first]))
    return out[0].permute(1, 2, 0).to(torch.uint8).numpy()


def _aug_sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL sharpness enhancement with factor U(0, 2) (< 1 blurs, > 1 sharpens)."""
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(float(rng.uniform(0.0, 2.0))), np.uint8)


def _aug_hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add integers ~ U{-50..50} to hue (cyclic) and saturation (clipped), each on a 0-255 scale, in HSV."""
    dh, ds = (int(v) for v in rng.integers(-50, 51, size=2))
    hsv = np.asarray(Image.fromarray(img).convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + dh) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
    return np.asarray(_from_mode(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.uint8)


def _aug_solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With probability 0.5, invert the pixels >= a threshold ~ U(32, 128)."""
    apply = bool(rng.random() < 0.5)
    threshold = rng.uniform(32.0, 128.0)
    if not apply:
        return img.copy()
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def _aug_posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep the top `bits` ~ randint(1, 8) bits of every channel (PIL ImageOps.posterize)."""
    bits = int(rng.integers(1, 9))
    return np.asarray(ImageOps.posterize(Image.fromarray(img), bits), dtype=np.uint8)


def _aug_fliplr(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 0.5."""
    return img[:, ::-1].copy() if rng.random() < 0.5 else img.copy()


def _aug_invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """255 - x."""
    return (255 - img).astype(np.uint8)


def _aug_autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL ImageOps.autocontrast with a cutoff of randint(0, 20) percent at each end of the histogram."""
    cutoff = int(rng.integers(0, 21))
    return np.asarray(ImageOps.autocontrast(Image.fromarray(img), cutoff=cutoff), dtype=np.uint8)


def _aug_equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL ImageOps.equalize (histogram equalisation per channel)."""
    return np.asarray(ImageOps.equalize(Image.fromarray(img)), dtype=np.uint8)


_AUGMENTERS: tuple[tuple[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]], ...] = (
    ("gamma", _aug_gamma),
    ("brightness", _aug_brightness),
    ("sharpness", _aug_sharpness),
    ("hue_saturation", _aug_hue_saturation),
    ("solarize", _aug_solarize),
    ("posterize", _aug_posterize),
    ("fliplr", _aug_fliplr),
    ("invert", _aug_invert),
    ("autocontrast", _aug_autocontrast),
    ("equalize", _aug_equalize),
)

#: Names of the 10 texture augmenters, in the order `augment_texture` indexes them.
AUGMENTER_NAMES: tuple[str, ...] = tuple(name for name, _ in _AUGMENTERS)


def augment_texture(
    texture: np.ndarray,
    rng: np.random.Generator,
    names: Sequence[str] | None = None,
    brightness_spaces: Sequence[str] = colorspaces.SPACES,
) -> np.ndarray:
    """Apply 3 distinct augmenters drawn without replacement from the 10 of §3, in the drawn order.

    `names` (a subsequence of `AUGMENTER_NAMES`) forces which augmenters run, in that order; their parameters are
    still drawn from `rng`. `brightness_spaces` are the colour spaces the brightness augmenter draws from
    (``synthesis.brightness_spaces``). Returns a new uint8 array of the same shape.
    """
    _check_image(texture, "texture")
    augmenters = dict(_AUGMENTERS, brightness=functools.partial(_aug_brightness, spaces=brightness_spaces))
    if names is None:
        names = [AUGMENTER_NAMES[int(i)] for i in rng.choice(len(AUGMENTER_NAMES), size=3, replace=False)]
    unknown = [n for n in names if n not in augmenters]
    if unknown:
        raise ValueError(f"unknown texture augmenter(s) {unknown}; known: {', '.join(AUGMENTER_NAMES)}")
    out = np.ascontiguousarray(texture)
    for name in names:
        out = np.ascontiguousarray(augmenters[name](out, rng))
    if out is texture:
        out = out.copy()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Perlin + texture paste
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerlinPaste:
    """Everything one Perlin paste used: the result, its mask, the (augmented) texture blended in and beta."""

    image: np.ndarray
    mask: np.ndarray
    texture: np.ndarray
    beta: float


def perlin_paste_details(
    image: np.ndarray,
    texture: np.ndarray,
    rng: np.random.Generator,
    cfg: SynthesisConfig,
    augment: bool = True,
) -> PerlinPaste:
    """`perlin_paste`, also returning the texture actually blended (after augmentation) and beta.

    With ``augment=False`` the texture is used as given (resized to the image when needed).
    """
    _check_image(image)
    _check_image(texture, "texture")
    height, width = image.shape[:2]
    if texture.shape[:2] != (height, width):
        texture = resize_texture(np.ascontiguousarray(texture), width, height, cfg.texture_resize)
    tex = augment_texture(texture, rng, brightness_spaces=cfg.brightness_spaces) if augment else texture.copy()
    m = perlin_mask((height, width), rng, cfg)
    beta = float(cfg.blend_max * rng.random())
    # x(1 - m) + (1 - beta) T m + beta x m in float64: outside the mask that is exactly x, inside exactly
    # (1 - beta) T + beta x (the zero terms add nothing in IEEE arithmetic), so only masked pixels are computed.
    out = image.copy()
    inside = (1.0 - beta) * tex[m].astype(np.float64) + beta * image[m].astype(np.float64)
    out[m] = np.clip(inside, 0.0, 255.0).astype(np.uint8)
    return PerlinPaste(image=out, mask=m.astype(np.uint8), texture=tex, beta=beta)


def perlin_paste(
    image: np.ndarray, texture: np.ndarray, rng: np.random.Generator, cfg: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Perlin + texture anomaly (DRAEM style, §3).

    The texture (RGB uint8, resized to the image if needed) is augmented with `augment_texture`; the mask m comes from
    `perlin_mask`; beta = cfg.blend_max * U(0, 1); out = x(1 - m) + (1 - beta) T m + beta x m in float64, clipped to
    [0, 255] and truncated to uint8. The mask may be empty by chance (then the image is unchanged).
    """
    res = perlin_paste_details(image, texture, rng, cfg)
    return res.image, res.mask


# --------------------------------------------------------------------------------------------------------------------
# Hybrid synthesis
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Synthesis:
    """A synthetic anomaly: the image, its {0, 1} mask and which kind produced it."""

    image: np.ndarray
    mask: np.ndarray
    kind: SynthesisKind


def synthesize_details(
    image: np.ndarray, rng: np.random.Generator, textures: TextureSource, cfg: SynthesisConfig
) -> Synthesis:
    """`synthesize`, also telling which kind of anomaly was made."""
    _check_image(image)
    if rng.random() < cfg.cutpaste_prob:
        if rng.random() < 0.5:
            return Synthesis(*cutpaste_normal(image, rng, cfg), kind="normal")
        return Synthesis(*cutpaste_scar(image, rng, cfg), kind="scar")
    height, width = image.shape[:2]
    texture = textures.sample(rng, max(height, width))
    return Synthesis(*perlin_paste(image, texture, rng, cfg), kind="perlin")


def synthesize(
    image: np.ndarray, rng: np.random.Generator, textures: TextureSource, cfg: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Hybrid pseudo-anomaly (§3): CutPaste with probability cfg.cutpaste_prob (normal or scar, 1/2 each), otherwise
    Perlin noise + a texture from `textures`. Returns (uint8 (H, W, 3) image, uint8 (H, W) mask in {0, 1})."""
    res = synthesize_details(image, rng, textures, cfg)
    return res.image, res.mask
