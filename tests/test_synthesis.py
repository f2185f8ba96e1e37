"""Tests of onenip.synthesis: CutPaste (normal, scar), Perlin + texture and the hybrid mode (method notes §3)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip.config import SynthesisConfig
from onenip.errors import DatasetError
from onenip.synthesis.per_image import (
    AUGMENTER_NAMES,
    ArrayTextures,
    FolderTextures,
    TextureSource,
    augment_texture,
    cutpaste_normal,
    cutpaste_scar,
    perlin_mask,
    perlin_noise,
    perlin_paste,
    perlin_paste_details,
    resize_bilinear,
    resize_texture,
    synthesize,
    synthesize_details,
)


def make_image(size: int, seed: int = 0) -> np.ndarray:
    """A busy RGB test image: a colour gradient plus noise, so that any paste changes pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), (xx + yy) % 256], axis=2)
    noise = rng.integers(-40, 41, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def check_pair(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    """Output image/mask types and the invariant that unmasked pixels are bit-identical to the input."""
    size = image.shape[0]
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert mask.dtype == np.uint8 and mask.shape == (size, size)
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert np.array_equal(out[mask == 0], image[mask == 0])


CFG = SynthesisConfig()


# --------------------------------------------------------------------------------------------------------------------
# CutPaste
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 224])
def test_cutpaste_normal_is_one_rectangle_in_area_range(size: int) -> None:
    image = make_image(size)
    before = image.copy()
    low, high = CFG.cutpaste_area
    changed = 0
    for seed in range(60):
        out, mask = cutpaste_normal(image, np.random.default_rng(seed), CFG)
        check_pair(image, out, mask)
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert mask.sum() == h * w, "mask is not one filled axis-aligned rectangle"
        frac = mask.sum() / size**2
        # int() truncation of each side loses < 1 pixel: area >= (a - 1)(b - 1) > ab - a - b.
        assert low - (h + w + 2) / size**2 <= frac <= high + 1e-9, frac
        aspect = w / h
        assert CFG.cutpaste_aspect[0] * 0.7 <= aspect <= CFG.cutpaste_aspect[1] / 0.7
        changed += not np.array_equal(out[mask == 1], image[mask == 1])
    assert changed >= 55  # the paste (different source, jittered) nearly always changes the masked pixels
    assert np.array_equal(image, before), "input modified in place"


def test_cutpaste_normal_aspect_uses_both_branches() -> None:
    image = make_image(224)
    wide = tall = 0
    for seed in range(80):
        _, mask = cutpaste_normal(image, np.random.default_rng(seed), CFG)
        ys, xs = np.nonzero(mask)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        wide += w > h
        tall += w < h
    assert wide >= 20 and tall >= 20


@pytest.mark.parametrize("size", [64, 128, 224])
def test_cutpaste_scar_mask_matches_paste_and_size(size: int) -> None:
    image = make_image(size, seed=1)
    before = image.copy()
    wmax, lmax = CFG.scar_width[1], CFG.scar_length[1]
    for seed in range(80):
        out, mask = cutpaste_scar(image, np.random.default_rng(seed), CFG)
        check_pair(image, out, mask)
        area = int(mask.sum())
        assert 0 < area <= wmax * lmax + 2 * (wmax + lmax), area
        ys, xs = np.nonzero(mask)
        extent = (wmax + lmax) / math.sqrt(2) + 2  # bounding box of a rotated w x l strip, |angle| <= 45
        assert ys.max() - ys.min() + 1 <= extent and xs.max() - xs.min() + 1 <= extent
    assert np.array_equal(image, before)


def test_cutpaste_scar_fixed_size() -> None:
    """Unrotated scars are exactly w x l; rotated ones keep about that area unless clipped at the border."""
    image = make_image(128, seed=2)
    cfg0 = dataclasses.replace(CFG, scar_width=[6, 6], scar_length=[20, 20], scar_rotation=0.0)
    for seed in range(20):
        out, mask = cutpaste_scar(image, np.random.default_rng(seed), cfg0)
        check_pair(image, out, mask)
        ys, xs = np.nonzero(mask)
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (20, 6)
        assert mask.sum() == 120
    cfg45 = dataclasses.replace(cfg0, scar_rotation=45.0)
    areas = []
    for seed in range(60):
        out, mask = cutpaste_scar(image, np.random.default_rng(seed), cfg45)
        check_pair(image, out, mask)
        areas.append(int(mask.sum()))
        assert 0 < areas[-1] <= 120 + 2 * (6 + 20)
    assert np.median(areas) >= 0.8 * 120


def test_cutpaste_scar_clipped_at_border() -> None:
    """The expanded patch overhangs the border for placements near the right/bottom edge; still handled."""
    image = make_image(32, seed=3)
    cfg = dataclasses.replace(CFG, scar_width=[16, 16], scar_length=[25, 25], scar_rotation=45.0)
    for seed in range(50):
        out, mask = cutpaste_scar(image, np.random.default_rng(seed), cfg)
        check_pair(image, out, mask)
        assert mask.sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# Perlin noise and masks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,res", [((224, 224), (2, 2)), ((224, 224), (32, 4)), ((64, 64), (32, 32)), ((50, 70), (32, 8)), ((7, 5), (2, 4))]
)
def test_perlin_noise_shape_range(shape: tuple[int, int], res: tuple[int, int]) -> None:
    noise = perlin_noise(shape, res, np.random.default_rng(0))
    assert noise.shape == shape and noise.dtype == np.float32
    assert np.isfinite(noise).all()
    assert noise.min() >= -1.0 and noise.max() <= 1.0
    if min(shape) >= 50:
        assert noise.std() > 0.05


def test_perlin_noise_is_gradient_noise() -> None:
    """Zero on the lattice, smooth between lattice points, seed-determined."""
    noise = perlin_noise((128, 128), (8, 4), np.random.default_rng(5))
    assert np.abs(noise[::16, ::32]).max() < 1e-6
    assert np.abs(np.diff(noise, axis=0)).max() < 0.3 and np.abs(np.diff(noise, axis=1)).max() < 0.3
    assert np.array_equal(noise, perlin_noise((128, 128), (8, 4), np.random.default_rng(5)))
    assert not np.array_equal(noise, perlin_noise((128, 128), (8, 4), np.random.default_rng(6)))


@pytest.mark.parametrize("size", [48, 64, 80, 128, 224, 256])
def test_perlin_mask_sizes(size: int) -> None:
    nonempty = 0
    for seed in range(20):
        m = perlin_mask((size, size), np.random.default_rng(seed), CFG)
        assert m.shape == (size, size) and m.dtype == bool
        nonempty += bool(m.any())
    assert nonempty >= 16


def test_perlin_mask_rotation_keeps_shape_and_fills_below_threshold() -> None:
    cfg = dataclasses.replace(CFG, perlin_rotation=90.0, perlin_threshold=-0.9)
    for seed in range(10):
        m = perlin_mask((96, 96), np.random.default_rng(seed), cfg)
        assert m.shape == (96, 96)
    # With a threshold far below every noise value, only the rotated-in corners (filled below it) stay 0.
    cfg = dataclasses.replace(CFG, perlin_rotation=45.0, perlin_threshold=-1.5)
    corners_empty = 0
    for seed in range(10):
        m = perlin_mask((96, 96), np.random.default_rng(seed), cfg)
        assert m[48, 48]
        corners_empty += not m[0, 0]
    assert corners_empty >= 5  # |angle| >= ~5 degrees uncovers the corner pixels in most draws


def test_perlin_mask_threshold_and_area() -> None:
    fracs = [perlin_mask((224, 224), np.random.default_rng(s), CFG).mean() for s in range(100)]
    assert 0.01 < float(np.mean(fracs)) < 0.2
    assert sum(f == 0 for f in fracs) <= 10


# --------------------------------------------------------------------------------------------------------------------
# Texture augmentation and Perlin paste
# --------------------------------------------------------------------------------------------------------------------


def test_augment_texture_changes_image() -> None:
    tex = make_image(64, seed=4)
    before = tex.copy()
    changed = 0
    for seed in range(30):
        out = augment_texture(tex, np.random.default_rng(seed))
        assert out.shape == tex.shape and out.dtype == np.uint8
        changed += not np.array_equal(out, tex)
    assert changed >= 27
    assert np.array_equal(tex, before)


@pytest.mark.parametrize("name", AUGMENTER_NAMES)
def test_each_augmenter_keeps_shape(name: str) -> None:
    tex = make_image(48, seed=5)
    out = augment_texture(tex, np.random.default_rng(0), names=[name])
    assert out.shape == tex.shape and out.dtype == np.uint8
    assert out is not tex
    if name == "invert":
        assert np.array_equal(out, 255 - tex)


def test_augment_texture_draws_three_distinct() -> None:
    with pytest.raises(ValueError, match="unknown"):
        augment_texture(make_image(16), np.random.default_rng(0), names=["nope"])
    a = augment_texture(make_image(32), np.random.default_rng(9))
    b = augment_texture(make_image(32), np.random.default_rng(9))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("size", [64, 224])
def test_perlin_paste_blend_formula(size: int) -> None:
    image = make_image(size, seed=6)
    texture = make_image(size, seed=7)[::-1].copy()
    before = image.copy(), texture.copy()
    nonempty = 0
    for seed in range(30):
        res = perlin_paste_details(image, texture, np.random.default_rng(seed), CFG)
        check_pair(image, res.image, res.mask)
        assert 0.0 <= res.beta < CFG.blend_max
        m = res.mask.astype(np.float64)[..., None]
        x, t = image.astype(np.float64), res.texture.astype(np.float64)
        expected = np.clip(x * (1 - m) + (1 - res.beta) * t * m + res.beta * x * m, 0, 255).astype(np.uint8)
        assert np.array_equal(res.image, expected)
        nonempty += bool(res.mask.any())
        # The public two-tuple function gives the same result for the same seed.
        out, mask = perlin_paste(image, texture, np.random.default_rng(seed), CFG)
        assert np.array_equal(out, res.image) and np.array_equal(mask, res.mask)
    assert nonempty >= 25
    assert np.array_equal(image, before[0]) and np.array_equal(texture, before[1])


def test_perlin_paste_without_blend_copies_texture() -> None:
    image = make_image(128, seed=8)
    texture = np.full((128, 128, 3), (10, 200, 77), np.uint8)
    cfg = dataclasses.replace(CFG, blend_max=0.0)
    for seed in range(10):
        res = perlin_paste_details(image, texture, np.random.default_rng(seed), cfg, augment=False)
        check_pair(image, res.image, res.mask)
        assert res.beta == 0.0
        assert (res.image[res.mask == 1] == (10, 200, 77)).all()


def test_perlin_paste_follows_the_texture_options() -> None:
    """cfg.brightness_spaces reaches the brightness augmenter and cfg.texture_resize the texture's resize."""
    image, texture = make_image(64), make_image(100, seed=1)
    luma, hsv = (dataclasses.replace(CFG, brightness_spaces=[s]) for s in ("YCrCb", "HSV"))
    forced = [perlin_paste_details(image, texture, np.random.default_rng(s), luma).texture.tobytes() !=
              perlin_paste_details(image, texture, np.random.default_rng(s), hsv).texture.tobytes() for s in range(12)]
    assert 2 <= sum(forced) < 12  # only where the brightness augmenter was among the three drawn
    smooth = dataclasses.replace(CFG, texture_resize="antialias")
    raw = perlin_paste_details(image, texture, np.random.default_rng(0), CFG, augment=False).texture
    soft = perlin_paste_details(image, texture, np.random.default_rng(0), smooth, augment=False).texture
    assert np.array_equal(raw, resize_bilinear(texture, 64, 64))
    assert np.array_equal(soft, resize_texture(texture, 64, 64, "antialias"))


def test_perlin_paste_resizes_texture() -> None:
    image = make_image(64)
    out, mask = perlin_paste(image, make_image(100, seed=1), np.random.default_rng(0), CFG)
    check_pair(image, out, mask)


# --------------------------------------------------------------------------------------------------------------------
# Texture sources
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 224])
def test_folder_textures(gen_textures: Path, size: int) -> None:
    src = FolderTextures(gen_textures)
    assert isinstance(src, TextureSource)
    assert len(src) > 0
    samples = [src.sample(np.random.default_rng(s), size) for s in range(4)]
    for tex in samples:
        assert tex.shape == (size, size, 3) and tex.dtype == np.uint8
    assert np.array_equal(samples[0], src.sample(np.random.default_rng(0), size))
    assert len({t.tobytes() for t in samples}) > 1


def test_resize_bilinear_samples_like_opencv() -> None:
    """OpenCV's INTER_LINEAR: centre-aligned, two taps per axis, edge pixels repeated; no antialiasing."""
    row = np.array([0, 10, 20, 30, 40, 50, 60, 70], dtype=np.uint8)
    img = np.repeat(row[None, :, None], 2, axis=0).repeat(3, axis=2)  # (2, 8, 3)
    # Shrinking 8 -> 2 reads source x = 1.5 and 5.5: 15 and 55.
    assert resize_bilinear(img, 2, 2)[0, :, 0].tolist() == [15, 55]
    stripes = np.array([0, 200, 200, 0] * 4, dtype=np.uint8)  # period 4
    small = resize_bilinear(np.repeat(stripes[None, :, None], 3, axis=2), 4, 1)  # x = 1.5, 5.5, ...: both taps 200
    assert small[0, :, 0].tolist() == [200, 200, 200, 200]  # PIL's antialiased bilinear gives about 100
    # Enlarging 2 -> 4: source x = -0.25 (clamped to the edge), 0.25, 0.75, 1.25 (clamped).
    up = resize_bilinear(np.array([[[0] * 3, [100] * 3]], dtype=np.uint8), 4, 1)
    assert up[0, :, 0].tolist() == [0, 25, 75, 100]
    same = make_image(16)
    out = resize_bilinear(same, 16, 16)
    assert np.array_equal(out, same) and out is not same


def test_resize_texture_methods() -> None:
    """synthesis.texture_resize: opencv is `resize_bilinear`; antialias is PIL's filter, which averages stripes away."""
    stripes = np.repeat(np.array([0, 200, 200, 0] * 4, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert resize_texture(stripes, 4, 1, "opencv")[0, :, 0].tolist() == [200, 200, 200, 200]
    smooth = resize_texture(stripes, 4, 1, "antialias")[0, :, 0]
    assert all(80 <= v <= 120 for v in smooth.tolist()), smooth
    img = make_image(40, seed=2)
    want = np.asarray(Image.fromarray(img).resize((24, 24), Image.Resampling.BILINEAR))
    assert np.array_equal(resize_texture(img, 24, 24, "antialias"), want)
    out = resize_texture(img, 40, 40, "antialias")
    assert np.array_equal(out, img) and out is not img
    with pytest.raises(ValueError, match="one of opencv, antialias"):
        resize_texture(img, 8, 8, "lanczos")
    with pytest.raises(ValueError, match="one of opencv, antialias"):
        ArrayTextures([img], resize="nearest")


def test_texture_sources_use_the_configured_resize(tmp_path: Path) -> None:
    img = make_image(50, seed=4)
    Image.fromarray(img).save(tmp_path / "t.png")
    for method in ("opencv", "antialias"):
        want = resize_texture(img, 32, 32, method)
        assert np.array_equal(FolderTextures(tmp_path, method).load(0, 32), want)
        assert np.array_equal(ArrayTextures([img], method).sample(np.random.default_rng(0), 32), want)
    assert not np.array_equal(resize_texture(img, 32, 32, "opencv"), resize_texture(img, 32, 32, "antialias"))


def test_folder_textures_resize_the_full_image(tmp_path: Path) -> None:
    """A JPEG is decoded at full size and then resized like OpenCV (a reduced-scale decode would smooth the detail)."""
    big = make_image(256, seed=3)
    Image.fromarray(big).save(tmp_path / "t.jpg", quality=95)
    with Image.open(tmp_path / "t.jpg") as im:
        full = np.asarray(im.convert("RGB"))
    got = FolderTextures(tmp_path).load(0, 64)
    assert np.array_equal(got, resize_bilinear(full, 64, 64))


def test_folder_textures_recursive_and_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty_textures"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="empty_textures"):
        FolderTextures(empty)
    with pytest.raises(DatasetError, match="missing_folder"):
        FolderTextures(tmp_path / "missing_folder")
    sub = tmp_path / "tex" / "a" / "b"
    sub.mkdir(parents=True)
    Image.fromarray(make_image(40)).save(sub / "one.PNG")
    Image.fromarray(make_image(30, seed=1)).save(sub / "two.Jpeg")
    src = FolderTextures(tmp_path / "tex")
    assert len(src) == 2
    assert src.sample(np.random.default_rng(0), 64).shape == (64, 64, 3)


def test_array_textures() -> None:
    images = [make_image(32, seed=1), make_image(80, seed=2)]
    src = ArrayTextures(images)
    for seed in range(6):
        tex = src.sample(np.random.default_rng(seed), 64)
        assert tex.shape == (64, 64, 3) and tex.dtype == np.uint8
    same = ArrayTextures([images[0]]).sample(np.random.default_rng(0), 32)
    assert np.array_equal(same, images[0]) and same is not images[0]
    with pytest.raises(DatasetError):
        ArrayTextures([])


# --------------------------------------------------------------------------------------------------------------------
# Hybrid synthesis
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def array_textures() -> ArrayTextures:
    return ArrayTextures([make_image(64, seed=s) for s in range(10, 14)])


def test_synthesize_reproducible(array_textures: ArrayTextures) -> None:
    image = make_image(64, seed=9)
    before = image.copy()
    for prob in (0.0, 1.0, 0.5):
        cfg = dataclasses.replace(CFG, cutpaste_prob=prob)
        for seed in range(5):
            a = synthesize(image, np.random.default_rng(seed), array_textures, cfg)
            b = synthesize(image, np.random.default_rng(seed), array_textures, cfg)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            check_pair(image, *a)
        outs = {synthesize(image, np.random.default_rng(s), array_textures, cfg)[0].tobytes() for s in range(6)}
        assert len(outs) >= 5
    assert np.array_equal(image, before)


def test_synthesize_hybrid_proportions(array_textures: ArrayTextures) -> None:
    image = make_image(64, seed=10)
    n = 400
    counts = {"normal": 0, "scar": 0, "perlin": 0}
    rng = np.random.default_rng(123)
    for _ in range(n):
        res = synthesize_details(image, rng, array_textures, CFG)
        check_pair(image, res.image, res.mask)
        counts[res.kind] += 1
        if res.kind == "normal":
            ys, xs = np.nonzero(res.mask)
            assert res.mask.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
        elif res.kind == "scar":
            assert 0 < res.mask.sum() <= 16 * 25 + 82
    # Binomial standard deviations: 8.7 for p = 1/4, 10 for p = 1/2; allow 4.5 of them.
    assert abs(counts["normal"] - n / 4) <= 4.5 * math.sqrt(n * 0.25 * 0.75), counts
    assert abs(counts["scar"] - n / 4) <= 4.5 * math.sqrt(n * 0.25 * 0.75), counts
    assert abs(counts["perlin"] - n / 2) <= 4.5 * math.sqrt(n * 0.25), counts


def test_synthesize_prob_extremes(array_textures: ArrayTextures) -> None:
    image = make_image(64, seed=11)
    never = dataclasses.replace(CFG, cutpaste_prob=0.0)
    always = dataclasses.replace(CFG, cutpaste_prob=1.0)
    kinds0 = {synthesize_details(image, np.random.default_rng(s), array_textures, never).kind for s in range(30)}
    kinds1 = {synthesize_details(image, np.random.default_rng(s), array_textures, always).kind for s in range(30)}
    assert kinds0 == {"perlin"}
    assert kinds1 == {"normal", "scar"}


def test_rejects_bad_images(array_textures: ArrayTextures) -> None:
    with pytest.raises(ValueError):
        synthesize(np.zeros((64, 64), np.uint8), np.random.default_rng(0), array_textures, CFG)
    with pytest.raises(ValueError):
        cutpaste_normal(np.zeros((64, 64, 3), np.float32), np.random.default_rng(0), CFG)
