"""PIL's and torchvision's uint8 image operations, per sample over a batch, in torch (the kernels of `onenip.synthesis.batched`).

The plain synthesis (`onenip.synthesis`) jitters CutPaste patches with torchvision's colour adjustments on PIL images
and augments textures with PIL (``ImageOps``, ``ImageEnhance``, HSV conversion), one image at a time. The fast path
needs the same operations for a whole batch with different parameters per sample, on whatever device the batch lives
on. These are those operations, written from the libraries' documented arithmetic:

* colour-jitter kernels with torchvision's semantics for uint8 *tensors* (grayscale weights, blending with clamping and
  truncation, hue through its float HSV conversion), which round slightly differently from its PIL-image path;
* PIL's 8-bit HSV conversion and the hue/saturation shift built on it;
* the per-channel lookup tables of PIL's ``ImageOps`` (equalize, autocontrast with a cutoff) and of gamma, solarize
  and posterize, from per-sample histograms, so that several augmenters fuse into one table lookup;
* ``ImageEnhance.Sharpness`` (PIL's SMOOTH filter, border pixels kept).

Images are float tensors (B, 3, H, W) holding integer values in [0, 255] (uint8 semantics: every operation clamps and
truncates, or rounds where the library does, before it returns); per-sample parameters are (B,) tensors. Every
computation is per sample, so computing a subset of rows gives the same values as computing all and selecting.
`onenip.synthesis.batched` draws the parameters and chooses which samples get which operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from onenip.synthesis import colorspaces

__all__ = [
    "blend",
    "gray",
    "histograms",
    "hsv255_to_rgb",
    "hsv_unit_to_rgb",
    "hue_saturation",
    "jitter_brightness",
    "jitter_contrast",
    "jitter_hue",
    "jitter_saturation",
    "lut_autocontrast",
    "lut_equalize",
    "lut_gamma",
    "lut_posterize",
    "lut_solarize",
    "per_sample",
    "rgb_to_hsv255",
    "rgb_to_hsv_unit",
    "sharpness",
    "to_u8_values",
]


# --------------------------------------------------------------------------------------------------------------------
# Helpers and colour conversions
# --------------------------------------------------------------------------------------------------------------------


def per_sample(t: Tensor) -> Tensor:
    """A (B,) tensor as (B, 1, 1, 1) for broadcasting over images."""
    return t.reshape(-1, 1, 1, 1)


def to_u8_values(x: Tensor) -> Tensor:
    """What ``.to(torch.uint8)`` keeps of a float image: clamp to [0, 255] and truncate (still float)."""
    return x.clamp(0.0, 255.0).floor()


def gray(x: Tensor) -> Tensor:
    """torchvision's grayscale (0.2989 R + 0.587 G + 0.114 B) of (B, 3, H, W), floored as for uint8 input: (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add(g, alpha=0.587).add(b, alpha=0.114).floor().unsqueeze(1)


def blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's uint8 ``blend``: factor * x + (1 - factor) * other, clamped and truncated; factor is (B,)."""
    f = per_sample(factor)
    return to_u8_values(x.mul(f).add(other * (1.0 - f)))


def rgb_to_hsv_unit(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue, saturation, value in [0, 1] of an RGB image in [0, 1], (B, 3, H, W) -> three (B, H, W) (torchvision)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    equal = maxc == minc
    spread = maxc - minc
    one = torch.ones_like(maxc)
    s = spread / torch.where(equal, one, maxc)
    div = torch.where(equal, one, spread)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h.mul(1.0 / 6.0).add(1.0).fmod(1.0)
    return h, s, maxc


def hsv_unit_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv_unit`: RGB (B, 3, H, W) in [0, 1] (torchvision)."""
    h6 = h * 6.0
    i = h6.floor()
    f = h6 - i
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (s * f + (1.0 - s))).clamp(0.0, 1.0)
    return colorspaces.select_sector(i.long().remainder(6), v, p, q, t)


def rgb_to_hsv255(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PIL's ``convert("HSV")`` of integer-valued RGB (B, 3, H, W): hue, saturation, value on 0..255, (B, H, W) each."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    equal = maxc == minc
    one = torch.ones_like(maxc)
    spread = torch.where(equal, one, maxc - minc)
    s = (maxc - minc) / torch.where(equal, one, maxc)
    rc, gc, bc = (maxc - r) / spread, (maxc - g) / spread, (maxc - b) / spread
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (h / 6.0 + 1.0).fmod(1.0)
    zero = torch.zeros_like(maxc)
    hue = torch.where(equal, zero, (h * 255.0).floor().clamp(0.0, 255.0))
    sat = torch.where(equal, zero, (s * 255.0).floor().clamp(0.0, 255.0))
    return hue, sat, maxc


def hsv255_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """PIL's HSV -> RGB conversion of integer-valued (B, H, W) hue/saturation/value on 0..255: (B, 3, H, W)."""
    h6 = h * (6.0 / 255.0)
    i = h6.floor()
    f = h6 - i
    fs = s / 255.0
    p = (v * (1.0 - fs) + 0.5).floor().clamp(0.0, 255.0)
    q = (v * (1.0 - fs * f) + 0.5).floor().clamp(0.0, 255.0)
    t = (v * (1.0 - fs * (1.0 - f)) + 0.5).floor().clamp(0.0, 255.0)
    rgb = colorspaces.select_sector(i.long().remainder(6), v, p, q, t)
    return torch.where((s == 0).unsqueeze(1), v.unsqueeze(1).expand_as(rgb), rgb)


# --------------------------------------------------------------------------------------------------------------------
# Colour jitter (torchvision tensor semantics, per-sample factors)
# --------------------------------------------------------------------------------------------------------------------


def jitter_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return to_u8_values(x * per_sample(factor))


def jitter_contrast(x: Tensor, factor: Tensor, valid: Tensor | None = None) -> Tensor:
    """Blend with the mean (floored) grayscale; over the pixels where `valid` (B, 1, H, W) is true when given."""
    luma = gray(x)
    if valid is None:
        mean = luma.mean(dim=(1, 2, 3), keepdim=True)
    else:
        w = valid.to(x.dtype)
        mean = (luma * w).sum(dim=(1, 2, 3), keepdim=True) / w.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1.0)
    return blend(x, mean, factor)


def jitter_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return blend(x, gray(x), factor)


def jitter_hue(x: Tensor, factor: Tensor) -> Tensor:
    h, s, v = rgb_to_hsv_unit(x * (1.0 / 255.0))
    h = (h + factor.reshape(-1, 1, 1)).remainder(1.0)
    return to_u8_values(hsv_unit_to_rgb(h, s, v) * (256.0 - 1e-3))


# --------------------------------------------------------------------------------------------------------------------
# Lookup tables, sharpness and hue/saturation (PIL semantics)
# --------------------------------------------------------------------------------------------------------------------


def histograms(x: Tensor) -> Tensor:
    """Per-sample, per-channel histograms (B, 3, 256) int64 of an integer-valued float image (B, 3, H, W)."""
    flat = x.flatten(2).long()
    hist = torch.zeros(flat.shape[0], flat.shape[1], 256, dtype=torch.long, device=x.device)
    return hist.scatter_add_(2, flat, torch.ones_like(flat))


def lut_equalize(hist: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize`` tables (B, 3, 256) float from histograms (B, 3, 256)."""
    total = hist.sum(dim=2, keepdim=True)
    cum = hist.cumsum(dim=2)
    last = hist.gather(2, cum.argmax(dim=2, keepdim=True))  # count of the highest occupied level
    step = (total - last) // 255
    before = cum - hist  # pixels strictly below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(0, 255)
    identity = torch.arange(256, device=hist.device).expand_as(lut)
    return torch.where(step > 0, lut, identity).float()


def lut_autocontrast(hist: Tensor, cutoff: Tensor) -> Tensor:
    """PIL ``ImageOps.autocontrast(cutoff=c)`` tables (B, 3, 256) float; `cutoff` (B,) integer percent per end."""
    total = hist.sum(dim=2, keepdim=True)
    cut = total * cutoff.long().view(-1, 1, 1) // 100
    cum = hist.cumsum(dim=2)
    suffix = total - cum + hist  # pixels at or above each level
    lo = (cum <= cut).sum(dim=2, keepdim=True)  # first level whose cumulative count exceeds the cut
    hi = 255 - (suffix <= cut).sum(dim=2, keepdim=True)  # last level whose suffix count exceeds the cut
    levels = torch.arange(256, device=hist.device).view(1, 1, 256)
    lut = ((levels - lo) * 255).div((hi - lo).clamp(min=1), rounding_mode="floor").clamp(0, 255)
    return torch.where(hi > lo, lut, levels.expand_as(lut)).float()


def lut_gamma(gammas: Tensor) -> Tensor:
    """Tables (B, 3, 256) of rint(255 (v / 255) ** gamma) for per-channel gammas (B, 3)."""
    base = torch.arange(256, device=gammas.device, dtype=torch.float32) / 255.0
    return (255.0 * base.view(1, 1, 256) ** gammas.unsqueeze(2)).round().clamp(0.0, 255.0)


def lut_solarize(apply: Tensor, threshold: Tensor) -> Tensor:
    """Tables (B, 3, 256): v >= threshold -> 255 - v where `apply` (B,) is true, identity elsewhere."""
    levels = torch.arange(256, device=threshold.device, dtype=torch.float32).view(1, 1, 256)
    flip = (levels >= threshold.view(-1, 1, 1)) & apply.view(-1, 1, 1)
    return torch.where(flip, 255.0 - levels, levels).expand(-1, 3, -1)


def lut_posterize(bits: Tensor) -> Tensor:
    """Tables (B, 3, 256) keeping the top `bits` (B,) in 1..8 bits of every level."""
    levels = torch.arange(256, device=bits.device).view(1, 1, 256)
    quantum = 2 ** (8 - bits.long()).view(-1, 1, 1)
    return (levels // quantum * quantum).float().expand(-1, 3, -1)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend the SMOOTH-filtered image (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13,
    rounded, border pixels kept) towards the image by `factor` (B,), truncated."""
    weight = colorspaces.device_constant(f"smooth_{x.dtype}", x.device, lambda: (torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype) / 13.0).expand(3, 1, 3, 3))
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, weight, groups=3).add(0.5).floor()
    return to_u8_values(smooth + per_sample(factor) * (x - smooth))


def hue_saturation(x: Tensor, dh: Tensor, ds: Tensor) -> Tensor:
    """Add integers (B,) to the hue (cyclic) and saturation (clipped) of PIL's 0..255 HSV."""
    h, s, v = rgb_to_hsv255(x)
    h = (h + dh.float().view(-1, 1, 1)).remainder(256.0)
    s = (s + ds.float().view(-1, 1, 1)).clamp(0.0, 255.0)
    return hsv255_to_rgb(h, s, v)
