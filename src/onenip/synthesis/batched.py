"""Batched pseudo-anomaly synthesis in pure torch: the fast path of `onenip.synthesis` (method §3, issue 4).

`onenip.synthesis` makes one anomaly at a time with numpy and PIL on the CPU. Training on one GPU at thousands of
images per second cannot afford that, so this module makes the same three kinds of anomaly for a whole batch of uint8
``(B, 3, S, S)`` images at once, on whatever device the images live on:

* **CutPaste-normal** and **CutPaste-scar** share one code path. Every sample draws its own rectangle (normal) or strip
  (scar) as tensors of per-sample sizes and positions; the source patch is gathered into a fixed-size canvas through
  per-pixel source coordinates, colour-jittered there (torchvision tensor ``ColorJitter`` semantics, per-sample factors
  and a per-sample random order; contrast uses the mean grayscale of the patch only), and every output pixel is mapped
  back into the patch frame: a plain shift for the normal rectangle, the inverse of PIL's ``rotate(expand=True)`` with
  nearest sampling for the scar (angle 0 for normal samples, where both coincide exactly).
* **Perlin + texture**: Perlin noise with per-sample lattice resolutions is evaluated by gathering the gradients of
  each pixel's cell from a lattice large enough for the largest resolution, rotated with ``affine_grid`` /
  ``grid_sample`` and thresholded. The texture (from a bank or a per-call pool) gets 3 of the 10 augmenters of
  `onenip.synthesis`; the per-channel lookup-table augmenters (gamma, solarize, posterize, invert, autocontrast,
  equalize) are fused into one batched table lookup per step; the others (brightness, sharpness, hue/saturation,
  flip) act on the samples that picked them; brightness is `onenip.colorspaces`, the very code the plain path runs.

Each kind, and each colour adjustment or texture augmenter, is applied to the samples that drew it in one of two ways
(`BatchSynthesizer.select_by_index`): on accelerators it is computed for the whole batch and kept per sample with
``torch.where`` (no host/device synchronisation, so the work is queued on the stream ahead of the training step, at the
price of redundant arithmetic); on the CPU only the selected rows are gathered by index and computed (cheapest there).
Both give the same values, since every computation is per sample; there is no Python loop over samples in either. The
hybrid choice is that of `onenip.synthesis.per_image.synthesize`: CutPaste with probability ``cfg.cutpaste_prob`` (normal or scar with
probability 1/2 each), Perlin + texture otherwise. All parameters of all kinds are drawn for every sample, in a fixed
order, so the random stream does not depend on the kinds drawn.

The per-pixel kernels (colour jitter, the lookup-table augmenters, sharpness, PIL's HSV) are `onenip.pixel_ops`; this
module draws their parameters, decides which samples get which, and makes the CutPaste and Perlin geometry.

The parameters are drawn from the same distributions as in `onenip.synthesis` but not from the same random stream:
all randomness comes from the explicit `torch.Generator` passed in (never torch's global RNG), so the same generator
seed and inputs give the same output on the same device. Inputs are never modified in place; outside the mask the output
is bit-identical to the input. Small rounding differences to the plain path remain: colour jitter follows torchvision's
tensor kernels instead of PIL's, PIL's HSV conversion and the texture blend are emulated in
float32, and the autocontrast table uses exact integer arithmetic where PIL's float table is sometimes one level lower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from onenip.config import SynthesisConfig
from onenip.errors import DatasetError
from onenip.synthesis import colorspaces, pixel_ops
from onenip.synthesis.per_image import AUGMENTER_NAMES, FolderTextures

__all__ = ["KIND_NAMES", "BatchSynthesis", "BatchSynthesizer", "load_texture_bank"]

#: Names of the kind codes in `BatchSynthesis.kind`: 0 = normal, 1 = scar, 2 = perlin.
KIND_NAMES: tuple[str, ...] = ("normal", "scar", "perlin")
_NORMAL, _SCAR, _PERLIN = 0, 1, 2

# Indices of the texture augmenters in `synthesis.AUGMENTER_NAMES` (the order `augment_texture` draws from).
_AUG = {name: i for i, name in enumerate(AUGMENTER_NAMES)}
_LUT_AUGMENTERS = ("gamma", "solarize", "posterize", "invert", "autocontrast", "equalize")

#: Per-sample parameters of one kind: name -> tensor whose leading dimension is the batch.
Params = dict[str, Tensor]


@dataclass(frozen=True)
class BatchSynthesis:
    """A batch of synthetic anomalies: images (B, 3, S, S) uint8, masks (B, 1, S, S) uint8 in {0, 1} and the kind
    of every sample, (B,) int64 (0 = normal, 1 = scar, 2 = perlin; see `KIND_NAMES`)."""

    image: Tensor
    mask: Tensor
    kind: Tensor


# --------------------------------------------------------------------------------------------------------------------
# Random draws (all from an explicit generator on the images' device)
# --------------------------------------------------------------------------------------------------------------------


def _rand(g: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.rand(shape, generator=g, device=device)


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float, device: torch.device) -> Tensor:
    return low + (high - low) * _rand(g, shape, device)


def _randint(g: torch.Generator, shape: tuple[int, ...], low: int, high: int, device: torch.device) -> Tensor:
    """Integers uniform in [low, high] (inclusive), int64."""
    return torch.randint(int(low), int(high) + 1, shape, generator=g, device=device)


def _below(u: Tensor, n: Tensor) -> Tensor:
    """Per-sample integers uniform in [0, n) from uniforms `u` in [0, 1) (int64, same shape)."""
    return torch.minimum((u * n.to(u.dtype)).floor().long(), n - 1)


# --------------------------------------------------------------------------------------------------------------------
# Per-sample selection
# --------------------------------------------------------------------------------------------------------------------


def _rows(t: Tensor, idx: Tensor | None) -> Tensor:
    """The rows `idx` of `t` (all of it for None)."""
    return t if idx is None else t.index_select(0, idx)


def _take(params: Params, idx: Tensor | None) -> Params:
    """Per-sample parameters (leading dimension B) of the rows `idx`."""
    return params if idx is None else {k: v.index_select(0, idx) for k, v in params.items()}


def _replace_rows(
    sel: Tensor, by_index: bool, fn: Callable[[Tensor | None], tuple[Tensor, ...]], base: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """`base` with the samples where `sel` (B,) is true replaced by what `fn` computes for them.

    ``fn(idx)`` computes results for the rows `idx` (for None: for every row). With `by_index` it runs on the selected
    rows only, which are copied into new tensors (fewer operations, but finding the rows synchronises with the device);
    otherwise it runs on every row and ``torch.where`` keeps the selected ones (no host/device synchronisation). Both
    give the same values: every computation here is per sample.
    """
    if by_index:
        idx = sel.nonzero().squeeze(1)
        if idx.numel() == 0:
            return base
        return tuple(b.index_copy(0, idx, r) for b, r in zip(base, fn(idx)))
    return tuple(torch.where(sel.view((-1,) + (1,) * (b.ndim - 1)), r, b) for b, r in zip(base, fn(None)))


# --------------------------------------------------------------------------------------------------------------------
# Colour jitter: each sample's adjustments in its drawn order (kernels in pixel_ops)
# --------------------------------------------------------------------------------------------------------------------


def _color_jitter(
    x: Tensor,
    order: Tensor,
    factors: Tensor,
    jitter: tuple[float, float, float, float],
    valid: Tensor | None = None,
    by_index: bool = False,
) -> Tensor:
    """Per-sample ``ColorJitter`` of integer-valued float images (B, 3, H, W).

    `order` (B, 4) is a permutation of (brightness, contrast, saturation, hue) per sample and `factors` (B, 4) the
    factors in that fixed column order (brightness/contrast/saturation ~ U(max(0, 1 - x), 1 + x), hue ~ U(-h, h)).
    An adjustment whose configured strength is 0 is skipped, as in the plain path. `valid` (B, 1, H, W) restricts the
    contrast mean to the patch pixels of a canvas.
    """

    def op(kind: int, y: Tensor, idx: Tensor | None) -> Tensor:
        f = _rows(factors[:, kind], idx)
        if kind == 0:
            return pixel_ops.jitter_brightness(y, f)
        if kind == 1:
            return pixel_ops.jitter_contrast(y, f, None if valid is None else _rows(valid, idx))
        if kind == 2:
            return pixel_ops.jitter_saturation(y, f)
        return pixel_ops.jitter_hue(y, f)

    for step in range(4):
        for kind in range(4):
            if jitter[kind] > 0:
                (x,) = _replace_rows(
                    order[:, step] == kind, by_index, lambda idx, y=x, k=kind: (op(k, _rows(y, idx), idx),), (x,)
                )
    return x


# --------------------------------------------------------------------------------------------------------------------
# CutPaste (normal and scar share the path; normal = scar geometry with angle 0)
# --------------------------------------------------------------------------------------------------------------------


def _normal_canvas(size: int, cfg: SynthesisConfig) -> tuple[int, int]:
    """Static (height, width) bounding every CutPaste-normal patch at this size."""
    area_hi = float(cfg.cutpaste_area[1]) * size * size
    low, high = float(cfg.cutpaste_aspect[0]), float(cfg.cutpaste_aspect[1])
    ph = int(math.sqrt(area_hi / min(low, 1.0))) + 1
    pw = int(math.sqrt(area_hi * max(high, 1.0))) + 1
    return max(1, min(ph, size)), max(1, min(pw, size))


def _scar_canvas(size: int, cfg: SynthesisConfig) -> tuple[int, int]:
    """Static (height, width) bounding every CutPaste-scar strip at this size."""
    return max(1, min(int(cfg.scar_length[1]), size)), max(1, min(int(cfg.scar_width[1]), size))


def _draw_cutpaste(g: torch.Generator, bsz: int, size: int, cfg: SynthesisConfig, is_scar: Tensor) -> Params:
    """Per-sample CutPaste parameters (normal where `is_scar` is false), drawn as in `synthesis.cutpaste_*`."""
    dev = is_scar.device
    # Normal: area fraction, aspect from U(low, 1) or U(1, high) with equal chance.
    area = _uniform(g, (bsz,), *cfg.cutpaste_area, dev) * (size * size)
    low, high = float(cfg.cutpaste_aspect[0]), float(cfg.cutpaste_aspect[1])
    wide = _rand(g, (bsz,), dev) >= 0.5
    aspect = torch.where(wide, _uniform(g, (bsz,), 1.0, high, dev), _uniform(g, (bsz,), low, 1.0, dev))
    n_pw = torch.sqrt(area * aspect).floor().long().clamp(1, size)
    n_ph = torch.sqrt(area / aspect).floor().long().clamp(1, size)
    # Scar: width and length from inclusive ranges, rotation angle.
    s_pw = _randint(g, (bsz,), *cfg.scar_width, dev).clamp(1, size)
    s_ph = _randint(g, (bsz,), *cfg.scar_length, dev).clamp(1, size)
    angle = _uniform(g, (bsz,), -float(cfg.scar_rotation), float(cfg.scar_rotation), dev)
    pw = torch.where(is_scar, s_pw, n_pw)
    ph = torch.where(is_scar, s_ph, n_ph)
    # Source and destination top-left corners, each uniform over the (pre-rotation) valid range.
    u = _rand(g, (4, bsz), dev)
    # Colour jitter: a random order of the four adjustments and their factors (torchvision's ColorJitter ranges).
    b, c, s, h = (float(v) for v in cfg.jitter)
    order = _rand(g, (bsz, 4), dev).argsort(dim=1)
    lows = colorspaces.device_constant(f"jitter_lows_{b}_{c}_{s}_{h}", dev, lambda: torch.tensor(
        [max(0.0, 1.0 - b), max(0.0, 1.0 - c), max(0.0, 1.0 - s), -h]))
    highs = colorspaces.device_constant(f"jitter_highs_{b}_{c}_{s}_{h}", dev, lambda: torch.tensor(
        [1.0 + b, 1.0 + c, 1.0 + s, h]))
    factors = lows + (highs - lows) * _rand(g, (bsz, 4), dev)
    return {
        "pw": pw,
        "ph": ph,
        "angle": torch.where(is_scar, angle, torch.zeros_like(angle)),
        "sy": _below(u[0], size - ph + 1),
        "sx": _below(u[1], size - pw + 1),
        "dy": _below(u[2], size - ph + 1),
        "dx": _below(u[3], size - pw + 1),
        "order": order,
        "factors": factors,
    }


def _paste_patches(
    images: Tensor, p: Params, canvas_hw: tuple[int, int], jitter: tuple[float, float, float, float], by_index: bool
) -> tuple[Tensor, Tensor]:
    """Cut, jitter, rotate and paste one patch per sample (parameters `p` from `_draw_cutpaste`).

    The (ph, pw) source patches are gathered into a (B, 3, Hc, Wc) canvas (`canvas_hw` must bound them) and jittered
    there. Then every output pixel is mapped into the patch frame by the inverse of PIL's ``rotate(angle,
    expand=True)`` (nearest, pixel centres) with the expanded box's top-left corner at (dy, dx); for angle 0 that is an
    exact shift. Returns (uint8 images, bool masks (B, 1, S, S)).
    """
    bsz, _, size, _ = images.shape
    dev = images.device
    hc, wc = canvas_hw
    pw, ph = p["pw"].view(-1, 1, 1), p["ph"].view(-1, 1, 1)
    cj = torch.arange(hc, device=dev).view(1, hc, 1)
    ci = torch.arange(wc, device=dev).view(1, 1, wc)
    src_y = (p["sy"].view(-1, 1, 1) + cj).clamp(max=size - 1)
    src_x = (p["sx"].view(-1, 1, 1) + ci).clamp(max=size - 1)
    src = (src_y * size + src_x).view(bsz, 1, hc * wc).expand(bsz, 3, hc * wc)
    canvas = images.flatten(2).gather(2, src).view(bsz, 3, hc, wc).float()
    valid = ((cj < ph) & (ci < pw)).unsqueeze(1)
    canvas = _color_jitter(canvas, p["order"], p["factors"], jitter, valid, by_index).to(torch.uint8)

    rad = p["angle"].view(-1, 1, 1) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    pwf, phf = pw.float(), ph.float()
    ext_w = pwf * cos.abs() + phf * sin.abs()
    ext_h = pwf * sin.abs() + phf * cos.abs()
    box_w = (pwf / 2 + ext_w / 2).ceil() - (pwf / 2 - ext_w / 2).floor()
    box_h = (phf / 2 + ext_h / 2).ceil() - (phf / 2 - ext_h / 2).floor()
    pos = torch.arange(size, device=dev, dtype=torch.float32)
    oy = pos.view(1, size, 1) - p["dy"].view(-1, 1, 1).float()  # (B, S, 1) row inside the expanded box
    ox = pos.view(1, 1, size) - p["dx"].view(-1, 1, 1).float()  # (B, 1, S) column inside the expanded box
    cy = oy + 0.5 - box_h / 2
    cx = ox + 0.5 - box_w / 2
    px = (cos * cx - sin * cy + pwf / 2).floor().long()
    py = (sin * cx + cos * cy + phf / 2).floor().long()
    inside = (px >= 0) & (px < pw) & (py >= 0) & (py < ph) & (ox >= 0) & (ox < box_w) & (oy >= 0) & (oy < box_h)
    idx = (py.clamp(0, hc - 1) * wc + px.clamp(0, wc - 1)).view(bsz, 1, size * size).expand(bsz, 3, size * size)
    pasted = canvas.flatten(2).gather(2, idx).view(bsz, 3, size, size)
    mask = inside.unsqueeze(1)
    return torch.where(mask, pasted, images), mask


def _cutpaste(
    images: Tensor, p: Params, is_scar: Tensor, cfg: SynthesisConfig, by_index: bool
) -> tuple[Tensor, Tensor]:
    """CutPaste of every sample (scar where `is_scar`, normal elsewhere): (uint8 images, bool masks (B, 1, S, S)).

    Normal patches use a canvas bounding the largest configured rectangle, scars a small one bounding the strip.
    """
    size = images.shape[-1]
    b, c, s, h = (float(v) for v in cfg.jitter)
    jitter = (b, c, s, h)
    base = (images, torch.zeros_like(images[:, :1], dtype=torch.bool))
    for sel, canvas_hw in ((~is_scar, _normal_canvas(size, cfg)), (is_scar, _scar_canvas(size, cfg))):
        base = _replace_rows(
            sel,
            by_index,
            lambda idx, hw=canvas_hw: _paste_patches(_rows(images, idx), _take(p, idx), hw, jitter, by_index),
            base,
        )
    return base[0], base[1]


# --------------------------------------------------------------------------------------------------------------------
# Perlin noise masks
# --------------------------------------------------------------------------------------------------------------------


def _fade(t: Tensor) -> Tensor:
    """Perlin's quintic smoothstep 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _draw_perlin(g: torch.Generator, bsz: int, cfg: SynthesisConfig, device: torch.device) -> Params:
    """Per-sample Perlin parameters: resolutions (2^a, 2^b), a, b ~ randint(cfg.perlin_scale) inclusive; gradient
    angles ~ U(0, 2 pi) on a lattice large enough for the largest resolution (a sample reads its top-left
    (res_y + 1) x (res_x + 1) corner: independent uniform angles, as in the plain path); rotation ~ U(+-perlin_rotation)."""
    lo, hi = int(cfg.perlin_scale[0]), int(cfg.perlin_scale[1])
    side = 2**hi + 1
    return {
        "res": 2 ** _randint(g, (bsz, 2), lo, hi, device),
        "angles": _uniform(g, (bsz, side * side), 0.0, 2.0 * math.pi, device),
        "degrees": _uniform(g, (bsz,), -float(cfg.perlin_rotation), float(cfg.perlin_rotation), device),
    }


def _perlin_noise(p: Params, size: int) -> Tensor:
    """(B, S, S) float32 Perlin noise in [-1, 1] from `_draw_perlin` parameters, as `synthesis.perlin_noise`: cell
    size ceil(S / res), unit gradients, quintic fade, scaled by sqrt(2), clipped."""
    res, angles = p["res"], p["angles"]
    bsz = res.shape[0]
    device = res.device
    side = math.isqrt(angles.shape[1])
    grad_y, grad_x = torch.sin(angles), torch.cos(angles)
    cell = (size + res - 1) // res  # (B, 2) cell size in pixels (ceil)
    pos = torch.arange(size, device=device).view(1, -1)
    cy, cx = cell[:, :1], cell[:, 1:]
    fy = ((pos % cy).float() / cy.float()).view(bsz, size, 1)  # position inside the cell
    fx = ((pos % cx).float() / cx.float()).view(bsz, 1, size)
    base = ((pos // cy).view(bsz, size, 1) * side + (pos // cx).view(bsz, 1, size)).view(bsz, size * size)

    def corner(off_y: int, off_x: int) -> Tensor:
        index = base + (off_y * side + off_x)
        gy = grad_y.gather(1, index).view(bsz, size, size)
        gx = grad_x.gather(1, index).view(bsz, size, size)
        return gy * (fy - float(off_y)) + gx * (fx - float(off_x))

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    ty, tx = _fade(fy), _fade(fx)
    top = n00 + tx * (n01 - n00)
    bottom = n10 + tx * (n11 - n10)
    return (math.sqrt(2.0) * (top + ty * (bottom - top))).clamp(-1.0, 1.0)


def _rotate_maps(maps: Tensor, degrees: Tensor, fill: float) -> Tensor:
    """Rotate square (B, S, S) maps about their centres by per-sample `degrees` (bilinear, counter-clockwise like PIL's
    ``rotate``); output pixels whose source point falls outside the map get `fill` (as PIL's ``fillcolor``)."""
    bsz, height, width = maps.shape
    rad = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [bsz, 1, height, width], align_corners=False)
    out = F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    outside = ((grid < -1.0) | (grid >= 1.0)).any(dim=-1)
    return torch.where(outside, torch.full_like(out, fill), out)


def _perlin_mask_from(p: Params, size: int, cfg: SynthesisConfig) -> Tensor:
    """(B, S, S) bool masks as `synthesis.perlin_mask`: the noise, rotated, > cfg.perlin_threshold."""
    fill = min(0.0, float(cfg.perlin_threshold) - 1.0)
    return _rotate_maps(_perlin_noise(p, size), p["degrees"], fill) > float(cfg.perlin_threshold)


def _perlin_masks(g: torch.Generator, bsz: int, size: int, cfg: SynthesisConfig, device: torch.device) -> Tensor:
    """`bsz` random (S, S) Perlin masks, bool (B, S, S)."""
    return _perlin_mask_from(_draw_perlin(g, bsz, cfg, device), size, cfg)


# --------------------------------------------------------------------------------------------------------------------
# Texture augmentation (3 of the 10 augmenters of onenip.synthesis, per sample)
# --------------------------------------------------------------------------------------------------------------------


def _space_codes(drawn: Tensor, spaces: Sequence[str]) -> Tensor:
    """`colorspaces.SPACES` codes of the `spaces` indexed by `drawn` (no host-to-device copy)."""
    out = torch.zeros_like(drawn)
    for i, name in enumerate(spaces):
        out = torch.where(drawn == i, colorspaces.SPACES.index(name), out)
    return out


def _draw_augment(
    g: torch.Generator, bsz: int, device: torch.device, spaces: Sequence[str] = colorspaces.SPACES
) -> Params:
    """Which 3 augmenters every sample gets ("chosen", (B, 3): distinct, in drawn order) and the parameters of every
    augmenter at every step ((B, 3) or (B, 3, 3)), from the distributions of `synthesis.augment_texture`; the
    brightness augmenter's colour space ("lum_space", a `colorspaces.SPACES` code) is drawn from `spaces`."""
    return {
        "chosen": _rand(g, (bsz, len(AUGMENTER_NAMES)), device).argsort(dim=1)[:, :3],
        "gamma": _uniform(g, (bsz, 3, 3), 0.5, 2.0, device),
        "lum_space": _space_codes(_randint(g, (bsz, 3), 0, len(spaces) - 1, device), spaces),
        "lum_mul": _uniform(g, (bsz, 3), 0.8, 1.2, device),
        "lum_add": _randint(g, (bsz, 3), -30, 30, device).float(),
        "lum_add_first": _rand(g, (bsz, 3), device) < 0.5,
        "sharpness": _uniform(g, (bsz, 3), 0.0, 2.0, device),
        "d_hue": _randint(g, (bsz, 3), -50, 50, device),
        "d_sat": _randint(g, (bsz, 3), -50, 50, device),
        "solarize": _rand(g, (bsz, 3), device) < 0.5,
        "sol_threshold": _uniform(g, (bsz, 3), 32.0, 128.0, device),
        "bits": _randint(g, (bsz, 3), 1, 8, device),
        "flip": _rand(g, (bsz, 3), device) < 0.5,
        "cutoff": _randint(g, (bsz, 3), 0, 20, device),
    }


def _augment_textures(x: Tensor, p: Params, by_index: bool = False) -> Tensor:
    """Apply every sample's 3 augmenters (`_draw_augment` parameters `p`) in order to an integer-valued float batch.

    At each step the per-channel lookup-table augmenters (gamma, solarize, posterize, invert, autocontrast, equalize)
    are fused into one table lookup; flip, brightness, sharpness and hue/saturation act on the samples that picked them.
    """
    dev = x.device
    identity = torch.arange(256, device=dev, dtype=torch.float32).view(1, 1, 256)
    for k in range(3):
        pick = p["chosen"][:, k]

        def lut_step(idx: Tensor | None, y: Tensor = x, k: int = k) -> tuple[Tensor, ...]:
            q = _take(p, idx)
            y = _rows(y, idx)
            pk = q["chosen"][:, k]
            hist = pixel_ops.histograms(y)
            tables = {
                "gamma": pixel_ops.lut_gamma(q["gamma"][:, k]),
                "solarize": pixel_ops.lut_solarize(q["solarize"][:, k], q["sol_threshold"][:, k]),
                "posterize": pixel_ops.lut_posterize(q["bits"][:, k]),
                "invert": (255.0 - identity).expand(y.shape[0], 3, 256),
                "autocontrast": pixel_ops.lut_autocontrast(hist, q["cutoff"][:, k]),
                "equalize": pixel_ops.lut_equalize(hist),
            }
            lut = identity.expand(y.shape[0], 3, 256)
            for name in _LUT_AUGMENTERS:
                lut = torch.where((pk == _AUG[name]).view(-1, 1, 1), tables[name], lut)
            return (lut.gather(2, y.flatten(2).long()).view_as(y),)

        is_lut = torch.zeros_like(pick, dtype=torch.bool)
        for name in _LUT_AUGMENTERS:
            is_lut |= pick == _AUG[name]
        (x,) = _replace_rows(is_lut, by_index, lut_step, (x,))

        others: tuple[tuple[Tensor, Callable[[Tensor, Params], Tensor]], ...] = (
            (pick == _AUG["fliplr"], lambda y, q, k=k: torch.where(pixel_ops.per_sample(q["flip"][:, k]), y.flip(-1), y)),
            (
                pick == _AUG["brightness"],
                lambda y, q, k=k: colorspaces.brightness(
                    y, q["lum_space"][:, k], q["lum_mul"][:, k], q["lum_add"][:, k], q["lum_add_first"][:, k],
                    skip_unused=by_index and not torch.compiler.is_compiling(),  # the CPU form's shortcut only
                ),
            ),
            (pick == _AUG["sharpness"], lambda y, q, k=k: pixel_ops.sharpness(y, q["sharpness"][:, k])),
            (pick == _AUG["hue_saturation"], lambda y, q, k=k: pixel_ops.hue_saturation(y, q["d_hue"][:, k], q["d_sat"][:, k])),
        )
        for sel, fn in others:
            (x,) = _replace_rows(sel, by_index, lambda idx, y=x, fn=fn: (fn(_rows(y, idx), _take(p, idx)),), (x,))
    return x


# --------------------------------------------------------------------------------------------------------------------
# Perlin + texture paste
# --------------------------------------------------------------------------------------------------------------------


def _draw_perlin_paste(g: torch.Generator, bsz: int, n_textures: int, cfg: SynthesisConfig, device: torch.device) -> Params:
    """Texture index (uniform), augmenters, Perlin mask and beta ~ cfg.blend_max * U(0, 1) of every sample."""
    p = {"texture": _below(_rand(g, (bsz,), device), torch.full((bsz,), n_textures, device=device))}
    p.update({f"aug_{k}": v for k, v in _draw_augment(g, bsz, device, cfg.brightness_spaces).items()})
    p.update({f"perlin_{k}": v for k, v in _draw_perlin(g, bsz, cfg, device).items()})
    p["beta"] = float(cfg.blend_max) * _rand(g, (bsz,), device)
    return p


def _perlin_paste(images: Tensor, textures: Tensor, p: Params, cfg: SynthesisConfig, by_index: bool) -> tuple[Tensor, Tensor]:
    """Perlin + texture anomaly of every sample, as `synthesis.perlin_paste_details`: inside the mask
    (1 - beta) T + beta x, clipped and truncated. Returns (uint8 images, bool masks (B, 1, S, S))."""
    size = images.shape[-1]
    tex = textures.index_select(0, p["texture"].to(textures.device)).to(images.device).float()
    tex = _augment_textures(tex, {k[4:]: v for k, v in p.items() if k.startswith("aug_")}, by_index)
    mask = _perlin_mask_from({k[7:]: v for k, v in p.items() if k.startswith("perlin_")}, size, cfg).unsqueeze(1)
    beta = pixel_ops.per_sample(p["beta"])
    inside = pixel_ops.to_u8_values((1.0 - beta) * tex + beta * images.float()).to(torch.uint8)
    return torch.where(mask, inside, images), mask


def _compose(images: Tensor, pool: Tensor, cut: Tensor, is_scar: Tensor, cp: Params, pp: Params, cfg: SynthesisConfig,
             by_index: bool) -> tuple[Tensor, Tensor]:
    """Every sample's anomaly from its draws: CutPaste where `cut` (scar where `is_scar`), Perlin + texture from
    `pool` elsewhere. (uint8 images (B, 3, S, S), bool masks (B, 1, S, S)); no random numbers drawn here."""
    base = (images, torch.zeros_like(images[:, :1], dtype=torch.bool))
    base = _replace_rows(
        cut, by_index, lambda idx: _cutpaste(_rows(images, idx), _take(cp, idx), _rows(is_scar, idx), cfg, by_index), base
    )
    image, mask = _replace_rows(
        ~cut, by_index, lambda idx: _perlin_paste(_rows(images, idx), pool, _take(pp, idx), cfg, by_index), base
    )
    return image, mask


# --------------------------------------------------------------------------------------------------------------------
# Public interface
# --------------------------------------------------------------------------------------------------------------------


def _check_batch(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(getattr(images, "shape", ()))
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{name} must be a uint8 tensor of shape (B, 3, S, S), got shape {shape} and dtype {dtype}")
    if images.shape[2] != images.shape[3] or images.shape[2] < 3:
        raise ValueError(f"{name} must be square and at least 3x3, got {images.shape[2]}x{images.shape[3]}")


class BatchSynthesizer:
    """Hybrid pseudo-anomalies for a batch (§3), the batched counterpart of `onenip.synthesis.per_image.synthesize`.

    Holds the configuration and an optional texture bank (a uint8 (T, 3, S, S) tensor, e.g. from `load_texture_bank`,
    best kept on the training device). Without a bank, every call must pass a texture pool (e.g. other training
    images, as the plain path's `ArrayTextures`).

    On the CPU every kind and every adjustment is computed only for the samples that use it (selected by index, which
    is cheap there); on other devices everything is computed for the whole batch and selected with ``torch.where``, so
    no call waits for the device. Both give the same values for the same draws.
    """

    def __init__(self, cfg: SynthesisConfig, textures: Tensor | None = None) -> None:
        """Keep `cfg` and the texture bank `textures` ((T, 3, S, S) uint8, at the input size S) or None."""
        if textures is not None:
            _check_batch(textures, "textures")
            if textures.shape[0] == 0:
                raise DatasetError("the texture bank is empty")
        self.cfg = cfg
        self.textures = textures
        #: Select samples by index (True), with torch.where (False), or by device (None: by index on the CPU only).
        self.select_by_index: bool | None = None
        self._compiled: Callable[..., tuple[Tensor, Tensor]] | None = None  # see `compile`
        self._compiled_batch = 0

    def compile(self, batch_size: int, mode: str = "default", **options: Any) -> None:
        """torch.compile the synthesis after its random draws, in the torch.where form (which this selects; the
        by-index form finds rows with data-dependent shapes). The draws stay eager: they are few, and the generator
        is the stream that makes a batch reproducible. Compiled for batches of `batch_size`; other sizes, such as an
        epoch's last batch, run eagerly instead of compiling again. `options` go to torch.compile (e.g. backend,
        fullgraph)."""
        self.select_by_index = False
        self._compiled = torch.compile(_compose, mode=mode, dynamic=False, **options)
        self._compiled_batch = batch_size

    @property
    def compiled(self) -> bool:
        """Whether `compile` was called."""
        return self._compiled is not None

    def details(self, images: Tensor, generator: torch.Generator, textures: Tensor | None = None) -> BatchSynthesis:
        """Synthesise one anomaly per image and tell which kind each sample got.

        `images` (B, 3, S, S) uint8 is not modified. `generator` must live on the images' device; it is the only source
        of randomness. `textures` (T, 3, S, S) uint8 overrides the bank given at construction for this call; only the
        B textures drawn from it are moved to the images' device.
        """
        _check_batch(images)
        pool = textures if textures is not None else self.textures
        if pool is None:
            raise ValueError("BatchSynthesizer has no texture bank: pass textures= to the call or to the constructor")
        _check_batch(pool, "textures")
        if pool.shape[0] == 0:
            raise DatasetError("the texture pool is empty")
        if pool.shape[2:] != images.shape[2:]:
            raise ValueError(
                f"textures are {pool.shape[2]}x{pool.shape[3]} but the images {images.shape[2]}x{images.shape[3]}; "
                "load the bank at the input size"
            )
        if generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device} but the images are on {images.device}")
        dev = images.device
        bsz, size = images.shape[0], images.shape[-1]
        by_index = self.select_by_index if self.select_by_index is not None else dev.type == "cpu"
        with torch.no_grad():
            # Every draw is made for every sample, in a fixed order, so the stream does not depend on the kinds.
            cut = _rand(generator, (bsz,), dev) < float(self.cfg.cutpaste_prob)
            scar = _rand(generator, (bsz,), dev) < 0.5
            codes = colorspaces.device_constant("kind_codes", dev, lambda: torch.tensor([_NORMAL, _SCAR, _PERLIN]))
            kind = torch.where(cut, torch.where(scar, codes[1], codes[0]), codes[2])
            is_scar = kind == _SCAR
            cp = _draw_cutpaste(generator, bsz, size, self.cfg, is_scar)
            pp = _draw_perlin_paste(generator, bsz, pool.shape[0], self.cfg, dev)
            compiled = self._compiled is not None and not by_index and bsz == self._compiled_batch
            compose = self._compiled if compiled else _compose
            image, mask = compose(images, pool, cut, is_scar, cp, pp, self.cfg, by_index)
        return BatchSynthesis(image=image, mask=mask.to(torch.uint8), kind=kind)

    def __call__(
        self, images: Tensor, generator: torch.Generator, textures: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(synthetic images (B, 3, S, S) uint8, masks (B, 1, S, S) uint8 in {0, 1}); see `details`."""
        res = self.details(images, generator, textures)
        return res.image, res.mask


def load_texture_bank(
    folder: str | Path, size: int, device: torch.device | str = "cpu", resize: str = "opencv"
) -> Tensor:
    """Every image under `folder` (as `synthesis.FolderTextures` lists them, sorted) as a uint8 (T, 3, size, size)
    tensor on `device`, resized like the plain path (`synthesis.resize_texture` by `resize`, i.e.
    ``synthesis.texture_resize``). Raises `DatasetError` for a missing or empty folder."""
    if size < 1:
        raise ValueError(f"texture size must be positive, got {size}")
    source = FolderTextures(folder, resize)
    bank = torch.empty((len(source), 3, size, size), dtype=torch.uint8)
    for i in range(len(source)):
        bank[i] = torch.from_numpy(source.load(i, size)).permute(2, 0, 1)
    return bank.to(device)
