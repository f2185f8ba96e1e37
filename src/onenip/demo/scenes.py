"""How the images of the demo dataset are drawn: its four categories and their defect types.

The drawing half of `onenip.demo.dataset` (which renders images from seeds and writes the dataset); its underscore
names are that module's, not a public API.

Categories (two textures, two objects; each image varies in pose, colour, lighting and noise):

``weave``
    Striped plain-weave fabric: navy warp threads with a cream stripe every few threads over beige weft threads.
    Thread period, angle (+/-1.5 degrees), phase, colours, per-thread thickness/brightness, illumination and fibre
    noise are jittered per image.
``grain``
    Wood grain: growth rings of an anisotropically distorted coordinate (light early wood, dark late wood), fibre
    streaks and slow colour variation. Ring frequency, direction, distortion and tint are jittered.
``disc``
    A turned-metal flange (washer) on a dark slate background: a centre hole, a raised hub, three bolt holes, a
    bevelled rim, the bow-tie highlight of turned metal and a soft drop shadow. Position (+/-2 % of the image),
    rotation (+/-20 degrees), radii, light direction and brightness are jittered.
``bracket``
    A blue powder-coated L-shaped bracket with three screw holes on light grey paper, with bevelled edges, a light
    gradient and a drop shadow. Position, rotation (+/-8 degrees), size, colour and light are jittered.

Defect types (drawn unlike the training pseudo-anomalies -- CutPaste rectangles/scars and Perlin blobs filled with
textures -- so a model cannot succeed by recognising its own synthesis):

``scratch`` (all categories)
    A thin curved scratch: a random cubic Bezier curve, 1-3 px wide (at 128 px), blended towards near-white or
    near-black. On objects it lies on the part.
``stain`` (weave, grain, bracket)
    A smooth soft-edged tinted blob (coffee/ink on fabric, water on wood, rust/oil on the bracket) with an irregular,
    noise-distorted outline.
``misweave`` (weave)
    A bent pattern region: the thread coordinates are smoothly displaced inside a Gaussian bump, so stripes and
    threads bend and shift locally.
``hole`` (grain)
    A round/elliptical hole (knot or worm hole): dark inside with a lit far wall and a shaded rim.
``dent`` (disc)
    A shallow impact depression shaded from the scene's light direction (bright and dark flanks, darker centre).
``missing`` (disc, bracket)
    Missing material: a bite out of the part's outline (outer rim for the disc, any edge for the bracket); the
    background -- and the changed shadow -- shows through.

Defect types alternate over a category's defective test images (``i % n_types``) and are numbered per type folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeAlias

import numpy as np
from scipy import ndimage

CATEGORIES: tuple[str, ...] = ("weave", "grain", "disc", "bracket")
"""Demo categories: two textures, then two objects."""

DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "weave": ("scratch", "stain", "misweave"),
    "grain": ("scratch", "hole", "stain"),
    "disc": ("scratch", "dent", "missing"),
    "bracket": ("scratch", "missing", "stain"),
}
"""Defect types of each category, in the order they alternate over the defective test images."""

FloatImage: TypeAlias = np.ndarray  # H x W x 3 float32, nominally in [0, 1] (clipped when quantised)


# --------------------------------------------------------------------------------------------------------------------
# Small drawing helpers
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each size x size float32, read-only."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise (periodic), size x size float32.

    Large blurs are computed on a downsampled grid and upsampled bilinearly, which keeps them cheap.
    """
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (2,))
    factor = int(max(1, min(8, np.floor(sig.min() / 2.0))))
    while size % factor:
        factor -= 1
    small = size // factor
    noise = rng.standard_normal((small, small), dtype=np.float32)
    out = ndimage.gaussian_filter(noise, sigma=tuple(sig / factor), mode="wrap")
    if factor > 1:
        out = ndimage.zoom(out, factor, order=1, mode="grid-wrap", grid_mode=True)
    out = out - out.mean()
    return (out / (out.std() + 1e-8)).astype(np.float32)


def _smoothstep(e0: float, e1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-coverage of a signed distance (pixels, negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _rounded_box_sdf(x: np.ndarray, y: np.ndarray, cx: float, cy: float, hx: float, hy: float, r: float) -> np.ndarray:
    qx = np.abs(x - cx) - (hx - r)
    qy = np.abs(y - cy) - (hy - r)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside - r


def _blend(img: FloatImage, colour: np.ndarray, alpha: np.ndarray) -> FloatImage:
    a = alpha[..., None]
    return img * (1.0 - a) + np.asarray(colour, dtype=np.float32) * a


# --------------------------------------------------------------------------------------------------------------------
# Scenes: parameters drawn once per image; `draw` can be re-run with a geometric edit (warp, cut) for some defects
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Edit:
    """Geometric edits that need the scene redrawn: a thread-coordinate warp (weave) or a circular cut (objects)."""

    warp: tuple[np.ndarray, np.ndarray] | None = None
    cut: tuple[float, float, float] | None = None


@dataclass
class _Scene:
    """One image's random parameters, its sensor noise and how to draw it."""

    category: str
    size: int
    params: dict[str, Any]
    noise: np.ndarray
    draw: Callable[[_Scene, _Edit], tuple[FloatImage, np.ndarray]]
    sdf: Callable[[_Scene, np.ndarray, np.ndarray, _Edit], np.ndarray] | None = None

    def render(self, edit: _Edit | None = None) -> tuple[FloatImage, np.ndarray]:
        """(image without sensor noise, object coverage -- all ones for textures)."""
        return self.draw(self, edit or _Edit())


def _sensor_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    lum = rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(sigma)
    chroma = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(sigma * 0.5)
    return lum + chroma


# ---- weave ---------------------------------------------------------------------------------------------------------


def _weave_scene(rng: np.random.Generator, s: int) -> _Scene:
    navy = np.array([0.16, 0.22, 0.46]) * (1.0 + rng.normal(0.0, 0.05, 3))
    cream = np.array([0.86, 0.80, 0.64]) * (1.0 + rng.normal(0.0, 0.03, 3))
    weft = np.array([0.66, 0.60, 0.50]) * (1.0 + rng.normal(0.0, 0.04, 3))
    stripe_every = int(rng.integers(5, 8))
    pattern = np.zeros(stripe_every, dtype=np.int64)
    pattern[-1] = 1
    params = {
        "period": s / rng.uniform(15.0, 17.5),
        "angle": np.deg2rad(rng.normal(0.0, 1.5)),
        "phase": rng.uniform(0.0, 64.0, 2),
        "palette": np.stack([navy, cream]).astype(np.float32),
        "pattern": pattern,
        "weft": weft.astype(np.float32),
        "jit_u": (1.0 + rng.normal(0.0, 0.06, 64)).astype(np.float32),
        "jit_v": (1.0 + rng.normal(0.0, 0.06, 64)).astype(np.float32),
        "illum": (1.0 + 0.05 * _smooth_noise(rng, s, s / 4.0)) * (1.0 + rng.normal(0.0, 0.04)),
        "fibre": 0.035 * _smooth_noise(rng, s, (0.6, 0.6)),
    }
    return _Scene("weave", s, params, _sensor_noise(rng, s, 0.012), _weave_draw)


def _weave_draw(scene: _Scene, edit: _Edit) -> tuple[FloatImage, np.ndarray]:
    p, s = scene.params, scene.size
    y, x = _grid(s)
    ca, sa = np.cos(p["angle"]), np.sin(p["angle"])
    u = (x * ca + y * sa) / p["period"] + p["phase"][0]
    v = (-x * sa + y * ca) / p["period"] + p["phase"][1]
    if edit.warp is not None:
        u = u + edit.warp[0]
        v = v + edit.warp[1]
    iu = np.floor(u).astype(np.int64)
    iv = np.floor(v).astype(np.int64)
    fu, fv = u - iu, v - iv
    top_warp = ((iu + iv) & 1) == 0
    warp_col = p["palette"][p["pattern"][iu % len(p["pattern"])]] * p["jit_u"][iu % 64][..., None]
    weft_col = p["weft"][None, None, :] * p["jit_v"][iv % 64][..., None]
    f_cross = np.where(top_warp, fu, fv)
    f_along = np.where(top_warp, fv, fu)
    cross = np.sqrt(np.clip(np.sin(np.pi * f_cross), 0.0, 1.0))
    along = 0.72 + 0.28 * np.sin(np.pi * f_along)
    shade = (0.22 + 0.88 * cross * along) * p["illum"] + p["fibre"]
    img = np.where(top_warp[..., None], warp_col, weft_col) * shade[..., None]
    return img.astype(np.float32), np.ones((s, s), dtype=np.float32)


# ---- grain ---------------------------------------------------------------------------------------------------------


def _grain_scene(rng: np.random.Generator, s: int) -> _Scene:
    light = np.array([0.82, 0.62, 0.40]) * (1.0 + rng.normal(0.0, 0.04, 3))
    dark = np.array([0.50, 0.30, 0.15]) * (1.0 + rng.normal(0.0, 0.05, 3))
    params = {
        "freq": rng.uniform(5.0, 8.0) / s,
        "angle": np.deg2rad(rng.normal(0.0, 3.0)),
        "phase": rng.uniform(0.0, 1.0),
        "distort": rng.uniform(0.8, 1.4) * _smooth_noise(rng, s, (0.06 * s, 0.3 * s)),
        "fibres": _smooth_noise(rng, s, (0.45, 5.0)),
        "slow": _smooth_noise(rng, s, 0.2 * s),
        "light": light.astype(np.float32),
        "dark": dark.astype(np.float32),
        "bright": rng.uniform(0.93, 1.07),
    }
    return _Scene("grain", s, params, _sensor_noise(rng, s, 0.01), _grain_draw)


def _grain_draw(scene: _Scene, edit: _Edit) -> tuple[FloatImage, np.ndarray]:
    p, s = scene.params, scene.size
    y, x = _grid(s)
    v = -x * np.sin(p["angle"]) + y * np.cos(p["angle"])
    t = v * p["freq"] + p["distort"] + p["phase"]
    ring = t - np.floor(t)
    late = 0.8 * ring**2.5 + 0.2 * _smoothstep(0.85, 1.0, ring)
    mix = np.clip(late + 0.05 * p["fibres"], 0.0, 1.0)
    col = p["light"] * (1.0 - mix[..., None]) + p["dark"] * mix[..., None]
    shade = p["bright"] * (1.0 + 0.05 * p["fibres"] + 0.04 * p["slow"])
    return (col * shade[..., None]).astype(np.float32), np.ones((s, s), dtype=np.float32)


# ---- objects: shared drawing ---------------------------------------------------------------------------------------


def _object_draw(scene: _Scene, edit: _Edit) -> tuple[FloatImage, np.ndarray]:
    """Composite an object (material from the scene's `material`) with a drop shadow over its background."""
    p, s = scene.params, scene.size
    y, x = _grid(s)
    assert scene.sdf is not None
    sdf = scene.sdf(scene, x, y, edit)
    cov = _coverage(sdf)
    ox, oy = p["shadow_offset"]
    shadow = _coverage(scene.sdf(scene, x - ox, y - oy, edit))
    shadow = ndimage.gaussian_filter(shadow, p["shadow_blur"], mode="nearest")
    bg = p["background"] * (1.0 - p["shadow_strength"] * shadow)[..., None]
    material = p["material"](scene, x, y, sdf)
    img = bg * (1.0 - cov[..., None]) + material * cov[..., None]
    return img.astype(np.float32), cov


def _bevel(sdf: np.ndarray, light: np.ndarray, width: float) -> np.ndarray:
    """Edge shading in [-1, 1] within `width` px inside the outline: positive where the edge faces the light.

    `light` is the unit image-plane direction towards the light; the outline's outward normal is the SDF gradient.
    """
    gy, gx = np.gradient(sdf)
    norm = np.hypot(gx, gy) + 1e-6
    facing = (gx * light[0] + gy * light[1]) / norm
    band = _smoothstep(-width, -width * 0.3, sdf) * (1.0 - _smoothstep(-0.5, 0.5, sdf))
    return (facing * band).astype(np.float32)


def _cut_sdf(sdf: np.ndarray, x: np.ndarray, y: np.ndarray, cut: tuple[float, float, float] | None) -> np.ndarray:
    if cut is None:
        return sdf
    cx, cy, r = cut
    return np.maximum(sdf, r - np.hypot(x - cx, y - cy))


# ---- disc ----------------------------------------------------------------------------------------------------------


def _disc_scene(rng: np.random.Generator, s: int) -> _Scene:
    light_angle = np.deg2rad(225.0 + rng.uniform(-30.0, 30.0))
    background = np.array([0.17, 0.18, 0.20]) * rng.uniform(0.9, 1.1)
    bg_tex = 0.025 * _smooth_noise(rng, s, 0.08 * s) + 0.015 * _smooth_noise(rng, s, 0.7)
    params = {
        "centre": s / 2.0 + rng.normal(0.0, 0.02 * s, 2),
        "rotation": np.deg2rad(rng.uniform(-20.0, 20.0)),
        "r_out": 0.38 * s * rng.uniform(0.97, 1.03),
        "r_hub": 0.19 * s * rng.uniform(0.97, 1.03),
        "r_in": 0.115 * s * rng.uniform(0.95, 1.05),
        "r_bolt_ring": 0.28 * s * rng.uniform(0.98, 1.02),
        "r_bolt": 0.036 * s * rng.uniform(0.9, 1.1),
        "light": np.array([np.cos(light_angle), np.sin(light_angle)]),
        "light_angle": light_angle,
        "bright": rng.uniform(0.9, 1.1),
        "tint": (np.array([0.96, 0.98, 1.0]) * (1.0 + rng.normal(0.0, 0.02, 3))).astype(np.float32),
        "ring_phase": rng.uniform(0.0, 2.0 * np.pi),
        "metal_tex": 0.02 * _smooth_noise(rng, s, (0.5, 0.5)),
        "background": (background[None, None, :] + bg_tex[..., None]).astype(np.float32),
        "shadow_offset": (0.02 * s, 0.025 * s),
        "shadow_blur": 0.02 * s,
        "shadow_strength": 0.6,
        "material": _disc_material,
    }
    return _Scene("disc", s, params, _sensor_noise(rng, s, 0.012), _object_draw, sdf=_disc_sdf)


def _disc_sdf(scene: _Scene, x: np.ndarray, y: np.ndarray, edit: _Edit) -> np.ndarray:
    p = scene.params
    cx, cy = p["centre"]
    r = np.hypot(x - cx, y - cy)
    sdf = np.maximum(r - p["r_out"], p["r_in"] - r)
    for k in range(3):
        a = p["rotation"] + 2.0 * np.pi * k / 3.0 - np.pi / 2.0
        bx, by = cx + p["r_bolt_ring"] * np.cos(a), cy + p["r_bolt_ring"] * np.sin(a)
        sdf = np.maximum(sdf, p["r_bolt"] - np.hypot(x - bx, y - by))
    return _cut_sdf(sdf, x, y, edit.cut)


def _disc_material(scene: _Scene, x: np.ndarray, y: np.ndarray, sdf: np.ndarray) -> FloatImage:
    p, s = scene.params, scene.size
    cx, cy = p["centre"]
    r = np.hypot(x - cx, y - cy)
    phi = np.arctan2(y - cy, x - cx)
    hub = _smoothstep(p["r_hub"] + 0.6, p["r_hub"] - 0.6, r)
    bowtie = np.cos(2.0 * (phi - p["light_angle"]))
    rings = 0.018 * np.sin(2.0 * np.pi * r / (0.025 * s) + p["ring_phase"])
    face = 0.52 + 0.16 * bowtie + rings
    hub_face = 0.60 + 0.14 * np.cos(2.0 * (phi - p["light_angle"]) + 0.9)
    intensity = face * (1.0 - hub) + hub_face * hub
    # step between hub and face: a thin ring lit on one side
    step = np.exp(-0.5 * ((r - p["r_hub"]) / 0.9) ** 2)
    facing = ((x - cx) * p["light"][0] + (y - cy) * p["light"][1]) / (r + 1e-6)
    intensity = intensity + 0.22 * step * facing
    intensity = intensity + 0.25 * _bevel(sdf, p["light"], 0.022 * s) + p["metal_tex"]
    return (intensity[..., None] * p["bright"] * p["tint"]).astype(np.float32)


# ---- bracket -------------------------------------------------------------------------------------------------------


def _bracket_scene(rng: np.random.Generator, s: int) -> _Scene:
    light_angle = np.deg2rad(225.0 + rng.uniform(-25.0, 25.0))
    background = np.array([0.80, 0.80, 0.77]) * rng.uniform(0.93, 1.05)
    bg_tex = 0.02 * _smooth_noise(rng, s, 0.1 * s) + 0.012 * _smooth_noise(rng, s, 0.8)
    paint = np.array([0.17, 0.33, 0.62]) * (1.0 + rng.normal(0.0, 0.05, 3))
    params = {
        "centre": np.array([0.52 * s, 0.52 * s]) + rng.normal(0.0, 0.02 * s, 2),
        "rotation": np.deg2rad(rng.uniform(-8.0, 8.0)),
        "scale": rng.uniform(0.96, 1.04),
        "light": np.array([np.cos(light_angle), np.sin(light_angle)]),
        "paint": paint.astype(np.float32),
        "coat": 0.03 * _smooth_noise(rng, s, 0.7),
        "gradient": rng.uniform(0.05, 0.12),
        "background": (background[None, None, :] + bg_tex[..., None]).astype(np.float32),
        "shadow_offset": (0.02 * s, 0.025 * s),
        "shadow_blur": 0.018 * s,
        "shadow_strength": 0.4,
        "material": _bracket_material,
    }
    return _Scene("bracket", s, params, _sensor_noise(rng, s, 0.012), _object_draw, sdf=_bracket_sdf)


def _bracket_local(scene: _Scene, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, s = scene.params, scene.size
    c, sn = np.cos(p["rotation"]), np.sin(p["rotation"])
    dx, dy = x - p["centre"][0], y - p["centre"][1]
    k = 1.0 / (p["scale"] * s)  # local units: fractions of the image size
    return (dx * c + dy * sn) * k, (-dx * sn + dy * c) * k


def _bracket_sdf(scene: _Scene, x: np.ndarray, y: np.ndarray, edit: _Edit) -> np.ndarray:
    lx, ly = _bracket_local(scene, x, y)
    arm_h = _rounded_box_sdf(lx, ly, 0.03, 0.20, 0.36, 0.10, 0.035)
    arm_v = _rounded_box_sdf(lx, ly, -0.23, -0.06, 0.10, 0.36, 0.035)
    sdf = np.minimum(arm_h, arm_v)
    for hx, hy in ((0.28, 0.20), (0.02, 0.20), (-0.23, -0.30)):
        sdf = np.maximum(sdf, 0.034 - np.hypot(lx - hx, ly - hy))
    sdf = sdf * (scene.params["scale"] * scene.size)  # back to pixels
    return _cut_sdf(sdf, x, y, edit.cut)


def _bracket_material(scene: _Scene, x: np.ndarray, y: np.ndarray, sdf: np.ndarray) -> FloatImage:
    p, s = scene.params, scene.size
    lx, ly = _bracket_local(scene, x, y)
    grad = (lx * p["light"][0] + ly * p["light"][1]) * p["gradient"] * 2.0
    shade = 1.0 + grad + p["coat"] + 0.45 * _bevel(sdf, p["light"], 0.025 * s)
    return (p["paint"][None, None, :] * shade[..., None]).astype(np.float32)


SCENES: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "weave": _weave_scene,
    "grain": _grain_scene,
    "disc": _disc_scene,
    "bracket": _bracket_scene,
}


# --------------------------------------------------------------------------------------------------------------------
# Defects. Each returns the defective image (no sensor noise) given the scene, its clean image and coverage.
# --------------------------------------------------------------------------------------------------------------------


def _interior_point(rng: np.random.Generator, cov: np.ndarray, margin: float) -> np.ndarray:
    """A random (x, y) pixel centre fully inside the object (the image, for textures), `margin` px from the border."""
    s = cov.shape[0]
    m = int(np.ceil(margin))
    inner = np.zeros_like(cov, dtype=bool)
    inner[m : s - m, m : s - m] = cov[m : s - m, m : s - m] > 0.99
    ys, xs = np.nonzero(inner)
    i = int(rng.integers(len(ys)))
    return np.array([xs[i] + 0.5, ys[i] + 0.5])


def _scratch(rng: np.random.Generator, scene: _Scene, clean: FloatImage, cov: np.ndarray) -> FloatImage:
    s = scene.size
    p0 = _interior_point(rng, cov, 0.08 * s)
    for _ in range(20):
        p3 = _interior_point(rng, cov, 0.08 * s)
        if 0.3 * s <= np.hypot(*(p3 - p0)) <= 0.6 * s:
            break
    d = p3 - p0
    normal = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-6)
    length = np.hypot(*d)
    p1 = p0 + d / 3.0 + normal * rng.normal(0.0, 0.2 * length)
    p2 = p0 + 2.0 * d / 3.0 + normal * rng.normal(0.0, 0.2 * length)
    t = np.linspace(0.0, 1.0, 40)[:, None]
    pts = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    width = rng.uniform(1.0, 2.6) * max(1.0, s / 128.0)
    pad = width + 2.0
    x0 = int(max(0, np.floor(pts[:, 0].min() - pad)))
    x1 = int(min(s, np.ceil(pts[:, 0].max() + pad)))
    y0 = int(max(0, np.floor(pts[:, 1].min() - pad)))
    y1 = int(min(s, np.ceil(pts[:, 1].max() + pad)))
    y, x = _grid(s)
    bx, by = x[y0:y1, x0:x1], y[y0:y1, x0:x1]
    dist = np.full(bx.shape, np.inf, dtype=np.float32)
    for a, b in zip(pts[:-1], pts[1:]):
        ab = b - a
        h = np.clip(((bx - a[0]) * ab[0] + (by - a[1]) * ab[1]) / (ab @ ab + 1e-9), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(bx - a[0] - h * ab[0], by - a[1] - h * ab[1]))
    alpha = np.zeros((s, s), dtype=np.float32)
    alpha[y0:y1, x0:x1] = np.clip(width / 2.0 + 0.5 - dist, 0.0, 1.0)
    alpha *= cov * rng.uniform(0.65, 0.9)
    colour = np.array([0.95, 0.94, 0.90]) if rng.random() < 0.5 else np.array([0.05, 0.04, 0.04])
    return _blend(clean, colour, alpha)


def _blob(rng: np.random.Generator, s: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Irregular soft blob in [0, 1]: a rotated ellipse whose outline is distorted by smooth noise."""
    y, x = _grid(s)
    ang = rng.uniform(0.0, np.pi)
    aspect = rng.uniform(0.6, 1.0)
    dx, dy = x - centre[0], y - centre[1]
    u = (dx * np.cos(ang) + dy * np.sin(ang)) / radius
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / (radius * aspect)
    d = np.hypot(u, v) + 0.22 * _smooth_noise(rng, s, 0.05 * s)
    return 1.0 - _smoothstep(0.55, 1.0, d)


_STAIN_COLOURS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "weave": ((0.42, 0.25, 0.10), (0.55, 0.10, 0.12)),  # coffee, wine
    "grain": ((0.22, 0.12, 0.05), (0.10, 0.10, 0.12)),  # water, ink
    "bracket": ((0.55, 0.30, 0.12), (0.20, 0.18, 0.10)),  # rust, oil
}


def _stain(rng: np.random.Generator, scene: _Scene, clean: FloatImage, cov: np.ndarray) -> FloatImage:
    s = scene.size
    centre = _interior_point(rng, cov, 0.12 * s)
    blob = _blob(rng, s, centre, rng.uniform(0.06, 0.12) * s) * cov
    options = _STAIN_COLOURS[scene.category]
    colour = np.array(options[int(rng.integers(len(options)))]) * rng.uniform(0.9, 1.1)
    return _blend(clean, colour, blob * rng.uniform(0.45, 0.7))


def _misweave(rng: np.random.Generator, scene: _Scene, clean: FloatImage, cov: np.ndarray) -> FloatImage:
    s = scene.size
    y, x = _grid(s)
    c = _interior_point(rng, cov, 0.12 * s)
    sigma = rng.uniform(0.04, 0.06) * s
    bump = np.exp(-0.5 * ((x - c[0]) ** 2 + (y - c[1]) ** 2) / sigma**2)
    amp_u = rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
    amp_v = rng.normal(0.0, 0.4)
    img, _ = scene.render(_Edit(warp=(amp_u * bump, amp_v * bump)))
    return img


def _hole(rng: np.random.Generator, scene: _Scene, clean: FloatImage, cov: np.ndarray) -> FloatImage:
    s = scene.size
    y, x = _grid(s)
    c = _interior_point(rng, cov, 0.1 * s)
    r = rng.uniform(0.03, 0.055) * s
    aspect = rng.uniform(0.75, 1.25)
    dx, dy = (x - c[0]) / aspect, (y - c[1]) * aspect
    d = np.hypot(dx, dy)
    light = np.array([-0.7071, -0.7071])
    facing = (dx * light[0] + dy * light[1]) / (d + 1e-6)  # +1 on the side towards the light
    inside = np.clip(r + 0.5 - d, 0.0, 1.0)
    # the far wall (away from the light) catches light; the near wall is in shadow
    depth = 0.06 + 0.16 * np.clip(-facing, 0.0, 1.0) * _smoothstep(0.2 * r, r, d)
    hole_col = np.array([0.30, 0.20, 0.12])[None, None, :] * depth[..., None] / 0.22
    img = clean * (1.0 - inside[..., None]) + hole_col * inside[..., None]
    rim = np.exp(-0.5 * ((d - r - 1.0) / 0.9) ** 2) * (1.0 - inside)
    img = img * (1.0 + 0.35 * (facing * rim)[..., None])
    return img.astype(np.float32)


def _dent(rng: np.random.Generator, scene: _Scene, clean: FloatImage, cov: np.ndarray) -> FloatImage:
    s = scene.size
    y, x = _grid(s)
    c = _interior_point(rng, cov, 0.1 * s)
    sigma = rng.uniform(0.022, 0.04) * s
    dx, dy = x - c[0], y - c[1]
    g = np.exp(-0.5 * (dx * dx + dy * dy) / sigma**2)
    # surface height h = -g: the wall nearest the light faces away from it (darker), the far wall is lit
    light = scene.params["light"]
    slope = -(dx * light[0] + dy * light[1]) / sigma * g / np.exp(-0.5)  # Lambert change, peak magnitude 1
    change = rng.uniform(0.3, 0.45) * slope - rng.uniform(0.04, 0.08) * g
    return (clean + (change * cov)[..., None]).astype(np.float32)


def _missing(rng: np.random.Generator, scene: _Scene, clean: FloatImage, cov: np.ndarray) -> FloatImage:
    s = scene.size
    p = scene.params
    y, x = _grid(s)
    assert scene.sdf is not None
    sdf = scene.sdf(scene, x, y, _Edit())
    edge = (sdf > -1.5) & (sdf < 0.0)
    if scene.category == "disc":  # chip the outer rim, not the holes
        edge &= np.hypot(x - p["centre"][0], y - p["centre"][1]) > 0.5 * (p["r_out"] + p["r_bolt_ring"])
    ys, xs = np.nonzero(edge)
    i = int(rng.integers(len(ys)))
    gy, gx = np.gradient(sdf)
    n = np.array([gx[ys[i], xs[i]], gy[ys[i], xs[i]]])
    n = n / (np.hypot(*n) + 1e-6)
    r = rng.uniform(0.05, 0.09) * s
    centre = np.array([xs[i] + 0.5, ys[i] + 0.5]) + n * r * rng.uniform(0.0, 0.35)
    img, _ = scene.render(_Edit(cut=(float(centre[0]), float(centre[1]), float(r))))
    return img


DEFECTS: dict[str, Callable[[np.random.Generator, _Scene, FloatImage, np.ndarray], FloatImage]] = {
    "scratch": _scratch,
    "stain": _stain,
    "misweave": _misweave,
    "hole": _hole,
    "dent": _dent,
    "missing": _missing,
}
