"""OpenCV's 8-bit colour conversions for the texture brightness augmenter (method §3), in torch.

The authors augment textures with imgaug's ``MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))``. For each image
it picks one of six colour spaces uniformly (YCrCb, HSV, HLS, Lab, Luv, YUV), converts the uint8 image there with
``cv2.cvtColor``, changes only the brightness channel (Y, V, L, L, L, Y) by a multiplication and an integer addition in
random order, each rounded and clipped to uint8, and converts back. The space matters: scaling V of HSV scales all
three channels, while adding to Y of YCrCb shifts them equally; L of Lab and Luv is perceptual lightness on the sRGB
gamma curve.

This module reproduces the cv2 8-bit conversions (``COLOR_RGB2*`` and back, OpenCV's coefficients, sRGB gamma for
Lab/Luv, 8-bit scalings, hue on 0..180) in float arithmetic with a rounding to uint8 after every conversion, as cv2
stores uint8 results. cv2 computes some of them in fixed point, so a value can differ from cv2's by a grey level or
two (the tests hold a set of cv2 results). It is written from the formulas of OpenCV's documentation.

Images are float tensors (B, 3, H, W) holding integer values in [0, 255]; every function returns the same. Both the
plain synthesis (one image at a time) and the batched fast path call `brightness`, so they share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from onenip.config import BRIGHTNESS_SPACES

__all__ = ["SPACES", "BRIGHTNESS_CHANNEL", "to_space", "from_space", "brightness", "select_sector"]

#: The colour spaces imgaug's brightness augmenter draws from, in imgaug's order (index = the drawn space code).
SPACES: tuple[str, ...] = BRIGHTNESS_SPACES
#: The channel that holds brightness in each space.
BRIGHTNESS_CHANNEL: dict[str, int] = {"YCrCb": 0, "HSV": 2, "HLS": 1, "Lab": 0, "Luv": 0, "YUV": 0}

# OpenCV's luma and chroma coefficients (RGB2YCrCb / RGB2YUV and their inverses).
_R2Y, _G2Y, _B2Y = 0.299, 0.587, 0.114
# (chroma of R - Y, chroma of B - Y) for (YCrCb, YUV), and the inverse (V->R, V->G, U->G, U->B) coefficients.
_CHROMA = {"YCrCb": (0.713, 0.564), "YUV": (0.877, 0.492)}
_CHROMA_INV = {"YCrCb": (1.403, -0.714, -0.344, 1.773), "YUV": (1.140, -0.581, -0.395, 2.032)}
# sRGB (D65) to XYZ and back, as OpenCV's Lab and Luv conversions use them; D65 white point.
_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_XYZ2RGB = ((3.240479, -1.53715, -0.498535), (-0.969256, 1.875991, 0.041556), (0.055648, -0.204043, 1.057311))
_WHITE = (0.950456, 1.0, 1.088754)
_UN, _VN = 0.19793943, 0.46831096  # u', v' of the white point
_EPS = 0.008856  # (6/29)^3
_KAPPA = 903.3


def _u8(x: Tensor) -> Tensor:
    """Round to nearest (half to even, as cv2's saturate_cast) and clip to [0, 255]."""
    return x.round().clamp(0.0, 255.0)


def _matmul3(m: tuple[tuple[float, float, float], ...], a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    return tuple(r[0] * a + r[1] * b + r[2] * c for r in m)


def _gamma_expand(v: Tensor) -> Tensor:
    """sRGB to linear light, v in [0, 1]."""
    return torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055).pow(2.4))


def _gamma_compress(v: Tensor) -> Tensor:
    """Linear light to sRGB, clipped to [0, 1] first."""
    v = v.clamp(0.0, 1.0)
    return torch.where(v <= 0.0031308, 12.92 * v, 1.055 * v.pow(1.0 / 2.4) - 0.055)


_CONSTANTS: dict[tuple[str, torch.device], Tensor] = {}


def device_constant(name: str, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
    """The constant tensor `name`, built once per device: a table the synthesis indexes with is copied to a GPU once,
    not at every batch (each copy of host data to a GPU makes the host wait)."""
    key = (name, torch.device(device))
    table = _CONSTANTS.get(key)
    if table is None:
        table = _CONSTANTS[key] = build().to(device)
    return table


# Which of the four candidates (v, p, q, t) is R, G and B in each of the six hue sectors (OpenCV's and PIL's order).
_SECTOR_TABLE = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def select_sector(sector: Tensor, v: Tensor, p: Tensor, q: Tensor, t: Tensor) -> Tensor:
    """(B, 3, H, W) RGB from the hue sector (B, H, W, int64 in [0, 6)) and the four candidate values (B, H, W).

    Shared by every hue-based conversion back to RGB (HSV and HLS here, PIL's HSV in `onenip.synthesis.batched`).
    """
    table = device_constant("sector_table", sector.device, lambda: torch.tensor(_SECTOR_TABLE, dtype=torch.long))
    index = table[:, sector].movedim(0, 1)  # (B, 3, H, W)
    return torch.stack((v, p, q, t), dim=1).gather(1, index)


def _wrap6(h6: Tensor) -> Tensor:
    return torch.where(h6 < 0, h6 + 6.0, torch.where(h6 >= 6.0, h6 - 6.0, h6))


def to_space(rgb: Tensor, space: str) -> Tensor:
    """cv2.cvtColor(rgb, COLOR_RGB2<space>) of uint8 values: (B, 3, H, W) -> (B, 3, H, W), integers in [0, 255]."""
    r, g, b = rgb.unbind(1)
    if space in _CHROMA:
        y = _u8(_R2Y * r + _G2Y * g + _B2Y * b)
        cr, cb = _CHROMA[space]
        c1, c2 = _u8((r - y) * cr + 128.0), _u8((b - y) * cb + 128.0)  # (Cr, Cb) or (V, U)
        return torch.stack((y, c1, c2) if space == "YCrCb" else (y, c2, c1), dim=1)
    if space in ("HSV", "HLS"):
        vmax, vmin = rgb.amax(1), rgb.amin(1)
        diff = vmax - vmin
        safe = torch.where(diff > 0, diff, torch.ones_like(diff))
        h = torch.where(vmax == r, g - b, torch.where(vmax == g, b - r + 2.0 * diff, r - g + 4.0 * diff)) / safe
        h = torch.where(diff > 0, torch.where(h < 0, h + 6.0, h), torch.zeros_like(h)) * 30.0  # degrees / 2
        hue = _u8(h)
        hue = torch.where(hue >= 180.0, hue - 180.0, hue)
        if space == "HSV":
            s = 255.0 * diff / torch.where(vmax > 0, vmax, torch.ones_like(vmax))  # diff = 0 where vmax = 0
            return torch.stack((hue, _u8(s), vmax), dim=1)
        hi, lo = vmax / 255.0, vmin / 255.0
        light = (hi + lo) / 2.0
        d = hi - lo
        den = torch.where(light < 0.5, hi + lo, 2.0 - hi - lo)
        s = torch.where(d > 0, d / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(d))
        return torch.stack((hue, _u8(light * 255.0), _u8(s * 255.0)), dim=1)
    if space in ("Lab", "Luv"):
        lin = _gamma_expand(rgb / 255.0)
        x, yy, z = _matmul3(_RGB2XYZ, *lin.unbind(1))

        def f(t: Tensor) -> Tensor:
            return torch.where(t > _EPS, t.clamp(min=0).pow(1.0 / 3.0), 7.787 * t + 16.0 / 116.0)

        fy = f(yy)
        if space == "Lab":
            fx, fz = f(x / _WHITE[0]), f(z / _WHITE[2])
            # 8-bit L = (116 fy - 16) * 255 / 100; cv2's integer code scales fy by 296 (116 * 255 / 100 rounded up)
            return torch.stack((_u8(296.0 * fy - 40.8), _u8(500.0 * (fx - fy) + 128.0), _u8(200.0 * (fy - fz) + 128.0)),
                               dim=1)
        light = 116.0 * fy - 16.0
        den = (x + 15.0 * yy + 3.0 * z).clamp(min=1e-12)
        u = 13.0 * light * (4.0 * x / den - _UN)
        v = 13.0 * light * (9.0 * yy / den - _VN)
        # cv2 truncates the 8-bit L of Luv (measured against cv2 4.6: 7 % of values differ, rounding gives 43 %)
        return torch.stack((light.mul(2.55).floor().clamp(0.0, 255.0), _u8((u + 134.0) * 255.0 / 354.0),
                            _u8((v + 140.0) * 255.0 / 262.0)), dim=1)
    raise ValueError(f"unknown colour space {space!r}; known: {', '.join(SPACES)}")


def from_space(x: Tensor, space: str) -> Tensor:
    """cv2.cvtColor(x, COLOR_<space>2RGB) of uint8 values: (B, 3, H, W) -> RGB (B, 3, H, W), integers in [0, 255]."""
    c0, c1, c2 = x.unbind(1)
    if space in _CHROMA:
        v2r, v2g, u2g, u2b = _CHROMA_INV[space]
        cr, cb = (c1, c2) if space == "YCrCb" else (c2, c1)  # YUV stores (Y, U, V)
        cr, cb = cr - 128.0, cb - 128.0
        return torch.stack((_u8(c0 + v2r * cr), _u8(c0 + v2g * cr + u2g * cb), _u8(c0 + u2b * cb)), dim=1)
    if space == "HSV":
        # cv2's 8-bit HSV -> RGB truncates (in float32) instead of rounding: measured against cv2 4.6, 1 % of values
        # then differ by one level, against 32 % with rounding. Truncation needs cv2's float32 rounding errors (a
        # float64 input would give 2.9999999 -> 2 elsewhere), so compute in float32 whatever the input's dtype.
        c0, c1, c2 = x.float().unbind(1)
        h6, s, v = _wrap6(c0 * (6.0 / 180.0)), c1 * (1.0 / 255.0), c2 * (1.0 / 255.0)
        f = h6 - h6.floor()
        rgb = select_sector(h6.floor().long().clamp(0, 5), v, v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)))
        rgb = torch.where((s == 0).unsqueeze(1), v.unsqueeze(1).expand_as(rgb), rgb)
        return (rgb * 255.0).floor().clamp(0.0, 255.0).to(x.dtype)
    if space == "HLS":
        h6, light, s = _wrap6(c0 / 30.0), c1 / 255.0, c2 / 255.0
        p2 = torch.where(light <= 0.5, light * (1.0 + s), light + s - light * s)
        p1 = 2.0 * light - p2
        f = h6 - h6.floor()
        rgb = select_sector(h6.floor().long().clamp(0, 5), p2, p1, p1 + (p2 - p1) * (1.0 - f), p1 + (p2 - p1) * f)
        rgb = torch.where((s == 0).unsqueeze(1), light.unsqueeze(1).expand_as(rgb), rgb)
        return _u8(rgb * 255.0)
    if space in ("Lab", "Luv"):
        light = c0 * 100.0 / 255.0
        yy = torch.where(light > 8.0, ((light + 16.0) / 116.0).pow(3.0), light / _KAPPA)
        if space == "Lab":
            fy = torch.where(light > 8.0, (light + 16.0) / 116.0, 7.787 * yy + 16.0 / 116.0)
            fx, fz = (c1 - 128.0) / 500.0 + fy, fy - (c2 - 128.0) / 200.0

            def finv(t: Tensor) -> Tensor:
                return torch.where(t > 6.0 / 29.0, t.pow(3.0), (t - 16.0 / 116.0) / 7.787)

            xx, zz = finv(fx) * _WHITE[0], finv(fz) * _WHITE[2]
        else:
            u, v = c1 * 354.0 / 255.0 - 134.0, c2 * 262.0 / 255.0 - 140.0
            # cv2's form of X = Y 9u'/(4v'), Z = Y (12 - 3u' - 20v')/(4v'), with 1/(4 * 13 L v') clipped to +-1/4
            up = 3.0 * (u + 13.0 * _UN * light)
            den = v + 13.0 * _VN * light
            vp = (0.25 / torch.where(den == 0, torch.full_like(den, 1e-12), den)).clamp(-0.25, 0.25)
            xx = 3.0 * yy * up * vp
            zz = yy * ((12.0 * 13.0 * light - up) * vp - 5.0)
        rgb = torch.stack(_matmul3(_XYZ2RGB, xx, yy, zz), dim=1)
        return _u8(_gamma_compress(rgb) * 255.0)
    raise ValueError(f"unknown colour space {space!r}; known: {', '.join(SPACES)}")


def brightness(rgb: Tensor, space: Tensor, mul: Tensor, add: Tensor, add_first: Tensor,
               skip_unused: bool | None = None) -> Tensor:
    """imgaug's MultiplyAndAddToBrightness of every image: (B, 3, H, W) RGB -> (B, 3, H, W) RGB.

    `space` (B,) int64 indexes `SPACES`; `mul` (B,) the factor, `add` (B,) the integer offset; `add_first` (B,) bool
    adds before multiplying. Each step is rounded and clipped to uint8, in the image's colour space. `skip_unused`
    skips the colour spaces no image drew, which reads a value back to the host: the CPU's shortcut (the default on
    the CPU outside a compiled graph); on an accelerator the wait would cost more than the conversion.
    """
    if skip_unused is None:
        skip_unused = rgb.device.type == "cpu" and not torch.compiler.is_compiling()
    m, a, first = mul.view(-1, 1, 1), add.view(-1, 1, 1), add_first.view(-1, 1, 1)
    out = rgb
    for code, name in enumerate(SPACES):
        sel = space == code
        if skip_unused and not bool(sel.any()):
            continue  # a space nobody drew
        conv = to_space(rgb, name)
        ch = BRIGHTNESS_CHANNEL[name]
        c = conv[:, ch]
        c = torch.where(first, _u8(_u8(c + a) * m), _u8(_u8(c * m) + a))
        conv = torch.cat((conv[:, :ch], c.unsqueeze(1), conv[:, ch + 1:]), dim=1)
        out = torch.where(sel.view(-1, 1, 1, 1), from_space(conv, name), out)
    return out
