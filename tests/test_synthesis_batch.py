"""Tests of onenip.synthesis_batch: the batched torch pseudo-anomaly synthesis, checked against the plain numpy/PIL
path of onenip.synthesis (same geometry and distributions) and against torchvision's colour kernels. CPU only."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF2
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

import onenip.synthesis.batched as sb
from onenip.config import SynthesisConfig
from onenip.errors import DatasetError
from onenip.synthesis import per_image as plain
from onenip.synthesis import pixel_ops
from onenip.synthesis.batched import KIND_NAMES, BatchSynthesis, BatchSynthesizer, load_texture_bank
from onenip.synthesis.per_image import AUGMENTER_NAMES, FolderTextures

CFG = SynthesisConfig()
CPU = torch.device("cpu")


def make_batch(bsz: int, size: int, seed: int = 0) -> Tensor:
    """A busy uint8 (B, 3, S, S) batch: colour gradients plus noise, different per sample."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), (xx + yy) % 256], axis=0)
    noise = rng.integers(-40, 41, size=(bsz, 3, size, size))
    shift = rng.integers(0, 256, size=(bsz, 3, 1, 1))
    return torch.from_numpy(((base[None] + noise + shift) % 256).astype(np.uint8))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def check_result(images: Tensor, res: BatchSynthesis) -> None:
    """Types and shapes, masks in {0, 1}, and unmasked pixels bit-identical to the input."""
    bsz, _, size, _ = images.shape
    assert res.image.dtype == torch.uint8 and res.image.shape == images.shape
    assert res.mask.dtype == torch.uint8 and res.mask.shape == (bsz, 1, size, size)
    assert set(res.mask.unique().tolist()) <= {0, 1}
    assert res.kind.dtype == torch.int64 and res.kind.shape == (bsz,)
    assert set(res.kind.tolist()) <= {0, 1, 2}
    outside = (res.mask == 0).expand_as(images)
    assert torch.equal(res.image[outside], images[outside])


# --------------------------------------------------------------------------------------------------------------------
# Contract of BatchSynthesizer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "bsz"), [(64, 1), (64, 16), (224, 1), (224, 16)])
def test_contract_and_inputs_untouched(size: int, bsz: int) -> None:
    images = make_batch(bsz, size)
    textures = make_batch(3, size, seed=9)
    before, tex_before = images.clone(), textures.clone()
    syn = BatchSynthesizer(CFG, textures)
    res = syn.details(images, gen(bsz))
    check_result(images, res)
    assert torch.equal(images, before) and torch.equal(textures, tex_before), "input modified in place"
    areas = res.mask.flatten(1).sum(1)
    assert (areas[res.kind != 2] > 0).all(), "every CutPaste sample has a non-empty mask"
    changed = (res.image != images).flatten(1).any(1)
    assert (changed | (areas == 0)).float().mean() >= 0.9  # a non-empty paste nearly always changes pixels
    out, mask = syn(images, gen(bsz))
    assert torch.equal(out, res.image) and torch.equal(mask, res.mask)
    assert KIND_NAMES == ("normal", "scar", "perlin")


def test_same_seed_same_output_other_seed_differs() -> None:
    images = make_batch(8, 64)
    syn = BatchSynthesizer(CFG, make_batch(4, 64, seed=5))
    torch.manual_seed(1)
    a = syn.details(images, gen(7))
    torch.manual_seed(2)  # the global RNG plays no part
    torch.rand(10)
    b = syn.details(images, gen(7))
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and torch.equal(a.kind, b.kind)
    c = syn.details(images, gen(8))
    assert not torch.equal(a.image, c.image)
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_and_where_selection_agree(seed: int) -> None:
    """The CPU path (samples selected by index) and the accelerator path (everything computed, torch.where) agree."""
    images = make_batch(24, 48, seed=seed)
    syn = BatchSynthesizer(CFG, make_batch(5, 48, seed=11))
    syn.select_by_index = True
    a = syn.details(images, gen(seed))
    syn.select_by_index = False
    b = syn.details(images, gen(seed))
    check_result(images, b)
    assert set(a.kind.tolist()) == {0, 1, 2}
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and torch.equal(a.kind, b.kind)


def test_compiled_synthesis_is_one_graph_with_the_eager_values() -> None:
    """train.compile_synthesis: everything after the draws traces into one graph (fullgraph: no break, no host sync)
    and computes the eager torch.where form's values. aot_eager traces as inductor does but runs the traced ops
    unchanged, so the values must be bit-identical; inductor's own kernels were measured instead (the config's help).
    Other batch sizes than the compiled one run eagerly, without compiling again."""
    import torch._dynamo

    torch._dynamo.reset()
    images, textures = make_batch(12, 48, seed=4), make_batch(5, 48, seed=11)
    eager = BatchSynthesizer(CFG, textures)
    eager.select_by_index = False
    syn = BatchSynthesizer(CFG, textures)
    syn.compile(12, backend="aot_eager", fullgraph=True)
    assert syn.select_by_index is False  # the compiled form is the torch.where one
    calls = []
    compiled = syn._compiled
    syn._compiled = lambda *a, **k: calls.append(a[0].shape[0]) or compiled(*a, **k)
    for seed in (0, 1):
        a, b = eager.details(images, gen(seed)), syn.details(images, gen(seed))
        assert set(a.kind.tolist()) == {0, 1, 2}
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and torch.equal(a.kind, b.kind)
    last = syn.details(images[:5], gen(2))  # an epoch's smaller last batch: eager
    assert torch.equal(last.image, eager.details(images[:5], gen(2)).image)
    assert calls == [12, 12]


@pytest.mark.parametrize("prob", [0.5, 0.2])
def test_kind_frequencies_follow_cutpaste_prob(prob: float) -> None:
    n = 400
    cfg = dataclasses.replace(CFG, cutpaste_prob=prob)
    res = BatchSynthesizer(cfg, make_batch(2, 32, seed=3)).details(make_batch(n, 32), gen(3))
    counts = torch.bincount(res.kind, minlength=3).tolist()
    n_cut = counts[0] + counts[1]
    assert abs(n_cut - n * prob) <= 4 * math.sqrt(n * prob * (1 - prob)), counts
    assert abs(counts[1] - n_cut / 2) <= 4 * math.sqrt(n_cut / 4), counts


def test_kind_extremes() -> None:
    images = make_batch(12, 32)
    tex = make_batch(2, 32, seed=1)
    only_cut = BatchSynthesizer(dataclasses.replace(CFG, cutpaste_prob=1.0), tex).details(images, gen(0))
    only_perlin = BatchSynthesizer(dataclasses.replace(CFG, cutpaste_prob=0.0), tex).details(images, gen(0))
    assert (only_cut.kind != 2).all() and (only_perlin.kind == 2).all()


# --------------------------------------------------------------------------------------------------------------------
# CutPaste
# --------------------------------------------------------------------------------------------------------------------


def test_normal_is_one_rectangle_in_area_range() -> None:
    size = 64
    cfg = dataclasses.replace(CFG, cutpaste_prob=1.0)
    images = make_batch(96, size)
    res = BatchSynthesizer(cfg, images[:2]).details(images, gen(4))
    check_result(images, res)
    low, high = cfg.cutpaste_area
    fracs, wide, tall = [], 0, 0
    for mask in res.mask[res.kind == 0, 0]:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert int(mask.sum()) == h * w, "mask is not one filled axis-aligned rectangle"
        frac = h * w / size**2
        assert low - (h + w + 2) / size**2 <= frac <= high + 1e-9, frac  # int() truncation loses < 1 pixel a side
        assert cfg.cutpaste_aspect[0] * 0.7 <= w / h <= cfg.cutpaste_aspect[1] / 0.7
        fracs.append(frac)
        wide, tall = wide + (w > h), tall + (w < h)
    assert len(fracs) >= 30 and wide >= 8 and tall >= 8
    assert 0.06 <= float(np.mean(fracs)) <= 0.09  # E[U(0.02, 0.15)] = 0.085, less the truncation


def test_normal_without_jitter_pastes_a_crop_of_the_image() -> None:
    size = 40
    cfg = dataclasses.replace(CFG, cutpaste_prob=1.0, jitter=[0.0, 0.0, 0.0, 0.0])
    images = make_batch(12, size, seed=2)
    res = BatchSynthesizer(cfg, images[:1]).details(images, gen(5))
    checked = 0
    for i in torch.nonzero(res.kind == 0).flatten().tolist():
        ys, xs = torch.nonzero(res.mask[i, 0], as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        patch = res.image[i, :, y0:y1, x0:x1].numpy()
        windows = np.lib.stride_tricks.sliding_window_view(images[i].numpy(), patch.shape)[0]
        assert (windows == patch).all(axis=(-3, -2, -1)).any(), "pasted rectangle is not a crop of the image"
        checked += 1
    assert checked >= 3


def _scar_params(pw: int, ph: int, angle: float, sy: int, sx: int, dy: int, dx: int) -> dict[str, Tensor]:
    p = {"pw": pw, "ph": ph, "sy": sy, "sx": sx, "dy": dy, "dx": dx}
    out = {k: torch.tensor([v]) for k, v in p.items()}
    out["angle"] = torch.tensor([angle], dtype=torch.float32)
    out["order"] = torch.arange(4).view(1, 4)
    out["factors"] = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    return out


def test_scar_geometry_matches_pil_rotate_expand() -> None:
    """Strip rotated by PIL (nearest, expand=True), placed at the pre-rotation location and clipped: same pixels."""
    size = 48
    rng = np.random.default_rng(0)
    image = make_batch(1, size, seed=4)
    img = image[0].permute(1, 2, 0).numpy()
    total = mask_diff = content_diff = 0
    for _ in range(60):
        pw, ph = int(rng.integers(2, 17)), int(rng.integers(10, 26))
        angle = float(rng.uniform(-45, 45))
        sy, sx = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
        dy, dx = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
        rgba = np.concatenate([img[sy : sy + ph, sx : sx + pw], np.full((ph, pw, 1), 255, np.uint8)], axis=2)
        rotated = np.asarray(Image.fromarray(rgba).rotate(angle, resample=Image.Resampling.NEAREST, expand=True))
        rotated = rotated[: size - dy, : size - dx]
        rh, rw = rotated.shape[:2]
        want_mask = np.zeros((size, size), bool)
        want_mask[dy : dy + rh, dx : dx + rw] = rotated[..., 3] > 0
        want = img.copy()
        region = want[dy : dy + rh, dx : dx + rw]
        region[rotated[..., 3] > 0] = rotated[..., :3][rotated[..., 3] > 0]
        out, mask = sb._paste_patches(image, _scar_params(pw, ph, angle, sy, sx, dy, dx), (25, 16), (0.0,) * 4, False)
        got_mask = mask[0, 0].numpy()
        total += int(want_mask.sum())
        mask_diff += int((got_mask != want_mask).sum())
        content_diff += int((out[0].permute(1, 2, 0).numpy() != want).any(-1).sum())
        # Nearest rotation keeps about w x l pixels.
        if dy + ph + pw <= size and dx + ph + pw <= size:  # not clipped at the border
            assert abs(int(got_mask.sum()) - pw * ph) <= 0.15 * pw * ph + 4, (pw, ph, angle, got_mask.sum())
    assert mask_diff <= 0.002 * total and content_diff <= 0.002 * total, (mask_diff, content_diff, total)


def test_scar_mask_sizes_follow_width_times_length() -> None:
    size = 96
    cfg = dataclasses.replace(CFG, cutpaste_prob=1.0)
    images = make_batch(160, size)
    res = BatchSynthesizer(cfg, images[:1]).details(images, gen(6))
    check_result(images, res)
    areas = res.mask[res.kind == 1].flatten(1).sum(1).float()
    wmin, wmax = cfg.scar_width
    lmin, lmax = cfg.scar_length
    assert len(areas) >= 50
    assert (areas > 0).all() and (areas <= wmax * lmax + 2 * (wmax + lmax)).all()
    expected = (wmin + wmax) / 2 * (lmin + lmax) / 2  # E[w] E[l]; clipping at the border removes a little
    assert 0.8 * expected <= float(areas.mean()) <= 1.1 * expected, (float(areas.mean()), expected)
    cfg0 = dataclasses.replace(cfg, scar_width=[6, 6], scar_length=[20, 20], scar_rotation=0.0)
    res0 = BatchSynthesizer(cfg0, images[:1]).details(images[:40], gen(6))
    assert (res0.mask[res0.kind == 1].flatten(1).sum(1) == 120).all()


# --------------------------------------------------------------------------------------------------------------------
# Colour jitter against torchvision
# --------------------------------------------------------------------------------------------------------------------


def test_jitter_ops_match_torchvision_per_sample() -> None:
    images = make_batch(3, 20, seed=8)
    x = images.float()
    cases = (
        (pixel_ops.jitter_brightness, TF2.adjust_brightness, [0.6, 1.0, 1.4]),
        (pixel_ops.jitter_contrast, TF2.adjust_contrast, [0.6, 1.0, 1.4]),
        (pixel_ops.jitter_saturation, TF2.adjust_saturation, [0.6, 1.0, 1.4]),
        (pixel_ops.jitter_hue, TF2.adjust_hue, [-0.1, 0.03, 0.1]),
    )
    for ours, theirs, factors in cases:
        got = ours(x, torch.tensor(factors))
        for i, f in enumerate(factors):
            want = theirs(images[i], f).float()
            assert (got[i] - want).abs().max() <= 1.0, (theirs.__name__, f)


def test_color_jitter_order_and_patch_mean_match_torchvision() -> None:
    """Per-sample order and factors; contrast blends with the mean grayscale of the patch, not of the canvas."""
    rng = np.random.default_rng(3)
    bsz, hc, wc = 6, 20, 16
    canvas = torch.from_numpy(rng.integers(0, 256, (bsz, 3, hc, wc)).astype(np.uint8))
    ph, pw = torch.tensor([5, 20, 12, 7, 1, 9]), torch.tensor([16, 3, 10, 7, 4, 1])
    valid = ((torch.arange(hc).view(1, -1, 1) < ph.view(-1, 1, 1)) & (torch.arange(wc).view(1, 1, -1) < pw.view(-1, 1, 1)))
    order = torch.from_numpy(np.stack([rng.permutation(4) for _ in range(bsz)]))
    factors = torch.tensor(np.stack([rng.uniform(0.6, 1.4, bsz), rng.uniform(0.2, 1.8, bsz), rng.uniform(0.6, 1.4, bsz),
                                     rng.uniform(-0.1, 0.1, bsz)], axis=1), dtype=torch.float32)
    got = sb._color_jitter(canvas.float(), order, factors, (0.4, 0.8, 0.4, 0.1), valid.unsqueeze(1))
    ops = (TF2.adjust_brightness, TF2.adjust_contrast, TF2.adjust_saturation, TF2.adjust_hue)
    for i in range(bsz):
        want = canvas[i, :, : ph[i], : pw[i]]
        for k in order[i].tolist():
            want = ops[k](want, float(factors[i, k]))
        diff = (got[i, :, : ph[i], : pw[i]] - want.float()).abs()
        assert diff.max() <= 2.0 and diff.mean() <= 0.1, (i, float(diff.max()), float(diff.mean()))


# --------------------------------------------------------------------------------------------------------------------
# Perlin masks
# --------------------------------------------------------------------------------------------------------------------


def test_perlin_noise_range_and_lattice() -> None:
    """Gradient noise is 0 on the lattice points (cell corners every ceil(S / res) pixels) and within [-1, 1]."""
    size = 60
    p = sb._draw_perlin(gen(0), 8, CFG, CPU)
    noise = sb._perlin_noise(p, size)
    assert noise.shape == (8, size, size) and noise.dtype == torch.float32
    assert noise.abs().max() <= 1.0 and noise.abs().max() > 0.5
    lo, hi = CFG.perlin_scale
    for i in range(8):
        ry, rx = p["res"][i].tolist()
        assert ry in [2**k for k in range(lo, hi + 1)] and rx in [2**k for k in range(lo, hi + 1)]
        cy, cx = -(-size // ry), -(-size // rx)
        assert noise[i, ::cy, ::cx].abs().max() < 1e-6
        assert noise[i, 1::cy, 1::cx].abs().max() > 0


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_perlin_mask_fraction_matches_numpy(threshold: float) -> None:
    size, n = 64, 200
    cfg = dataclasses.replace(CFG, perlin_threshold=threshold)
    rng = np.random.default_rng(0)
    ref = np.array([plain.perlin_mask((size, size), rng, cfg).mean() for _ in range(n)])
    ours = sb._perlin_masks(gen(0), n, size, cfg, CPU).float().mean(dim=(1, 2)).numpy()
    se = math.sqrt(ref.var() / n + ours.var() / n)
    assert abs(ours.mean() - ref.mean()) <= 4 * se, (ours.mean(), ref.mean(), se)
    assert 0.7 <= ours.std() / ref.std() <= 1.4, (ours.std(), ref.std())


def test_rotate_maps_matches_pil() -> None:
    noise = sb._perlin_noise(sb._draw_perlin(gen(1), 3, CFG, CPU), 64)
    degrees = torch.tensor([4.0, -3.0, 0.0])
    ours = sb._rotate_maps(noise, degrees, -0.5)
    for i in range(3):
        ref = plain._rotate_noise(noise[i].numpy(), float(degrees[i]), -0.5)
        diff = np.abs(ours[i].numpy() - ref)
        assert diff.mean() < 2e-3 and (diff > 0.05).mean() < 0.01, (diff.mean(), (diff > 0.05).mean())
    assert (ours[2] - noise[2]).abs().max() < 1e-4  # 0 degrees: identity up to grid rounding


# --------------------------------------------------------------------------------------------------------------------
# Texture augmentation
# --------------------------------------------------------------------------------------------------------------------


def _textures() -> Tensor:
    """Random, smooth and low-contrast test images (histogram operations differ on each)."""
    rand = make_batch(2, 40, seed=12)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    smooth = torch.stack([xx * 6, yy * 6, (xx + yy) * 3]).clamp(0, 255).to(torch.uint8)
    return torch.cat([rand, smooth[None], (smooth // 2 + 60)[None]])


def _apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    return lut.gather(2, x.flatten(2).long()).view_as(x)


def test_lookup_table_augmenters_match_pil() -> None:
    tex = _textures()
    x = tex.float()
    bsz = x.shape[0]
    hist = pixel_ops.histograms(x)
    for i in range(bsz):
        want = from_pil(ImageOps.equalize(to_pil(tex[i]))).float()
        assert torch.equal(_apply_lut(x, pixel_ops.lut_equalize(hist))[i], want)
    assert torch.equal(_apply_lut(x, pixel_ops.lut_equalize(hist)), TF2.equalize(tex).float())
    for cutoff in (0, 3, 20):
        got = _apply_lut(x, pixel_ops.lut_autocontrast(hist, torch.full((bsz,), cutoff)))
        for i in range(bsz):
            want = from_pil(ImageOps.autocontrast(to_pil(tex[i]), cutoff=cutoff)).float()
            assert (got[i] - want).abs().max() <= 1.0  # PIL's float lookup table, exact integer division here
    for bits in (1, 4, 8):
        got = _apply_lut(x, pixel_ops.lut_posterize(torch.full((bsz,), bits)))
        for i in range(bsz):
            assert torch.equal(got[i], from_pil(ImageOps.posterize(to_pil(tex[i]), bits)).float())
    got = _apply_lut(x, pixel_ops.lut_solarize(torch.tensor([True, False, True, True]), torch.tensor([50.0, 50.0, 100.0, 127.5])))
    assert torch.equal(got[0], torch.where(x[0] >= 50, 255 - x[0], x[0])) and torch.equal(got[1], x[1])
    assert torch.equal(got[3], torch.where(x[3] >= 127.5, 255 - x[3], x[3]))
    gammas = torch.tensor([[0.5, 1.0, 2.0]]).expand(bsz, 3)
    got = _apply_lut(x, pixel_ops.lut_gamma(gammas))
    base = np.arange(256) / 255.0
    for ch, gamma in enumerate((0.5, 1.0, 2.0)):
        want = plain._lut(tex[:, ch].numpy(), 255.0 * base**gamma)
        assert (got[:, ch] - torch.from_numpy(want).float()).abs().max() <= 1.0


def test_image_augmenters_match_pil() -> None:
    tex = _textures()
    x = tex.float()
    bsz = x.shape[0]
    for factor in (0.0, 0.5, 1.7):
        got = pixel_ops.sharpness(x, torch.full((bsz,), factor))
        for i in range(bsz):
            want = from_pil(ImageEnhance.Sharpness(to_pil(tex[i])).enhance(factor)).float()
            assert torch.equal(got[i], want), factor
    for dh, ds in ((0, 0), (13, -20), (-50, 50)):
        got = pixel_ops.hue_saturation(x, torch.full((bsz,), dh), torch.full((bsz,), ds))
        for i in range(bsz):
            hsv = np.asarray(to_pil(tex[i]).convert("HSV"), dtype=np.int16).copy()
            hsv[..., 0] = (hsv[..., 0] + dh) % 256
            hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
            want = from_pil(plain._from_mode(hsv.astype(np.uint8), "HSV").convert("RGB")).float()
            diff = (got[i] - want).abs()
            assert diff.max() <= 8 and (diff > 1).float().mean() < 0.01, (dh, ds, float(diff.max()))


def _forced_augment(chosen: list[list[str]], **params: Tensor) -> dict[str, Tensor]:
    p = sb._draw_augment(gen(0), len(chosen), CPU)
    p["chosen"] = torch.tensor([[AUGMENTER_NAMES.index(n) for n in row] for row in chosen])
    p.update(params)
    return p


def test_augment_textures_applies_the_chosen_augmenters_in_order() -> None:
    tex = _textures()[:2]
    x = tex.float()
    p = _forced_augment(
        [["invert", "fliplr", "posterize"], ["posterize", "invert", "equalize"]],
        flip=torch.ones(2, 3, dtype=torch.bool),
        bits=torch.full((2, 3), 2),
    )
    for by_index in (False, True):
        got = sb._augment_textures(x, p, by_index)
        first = to_pil(tex[0])
        want0 = from_pil(ImageOps.posterize(ImageOps.mirror(ImageOps.invert(first)), 2))
        want1 = from_pil(ImageOps.equalize(ImageOps.invert(ImageOps.posterize(to_pil(tex[1]), 2))))
        assert torch.equal(got[0], want0.float()) and torch.equal(got[1], want1.float())
    assert torch.equal(x, tex.float())


def test_augmenter_choice_is_three_distinct_uniform() -> None:
    n = 3000
    chosen = sb._draw_augment(gen(2), n, CPU)["chosen"]
    assert chosen.shape == (n, 3)
    assert (chosen.sort(dim=1).values.diff(dim=1) > 0).all(), "augmenters repeat within a sample"
    for k in range(3):
        counts = torch.bincount(chosen[:, k], minlength=10).float()
        assert (counts - n / 10).abs().max() <= 4 * math.sqrt(n * 0.1 * 0.9), counts


def test_brightness_space_drawn_from_the_configured_spaces() -> None:
    """synthesis.brightness_spaces: codes of the listed spaces only, uniform; every other draw is unchanged."""
    n = 3000
    default = sb._draw_augment(gen(5), n, CPU)
    assert set(default["lum_space"].unique().tolist()) == set(range(6))
    some = sb._draw_augment(gen(5), n, CPU, ("Luv", "HSV"))
    counts = torch.bincount(some["lum_space"].flatten(), minlength=6)
    assert counts[[0, 2, 3, 5]].sum() == 0
    assert (counts[[1, 4]].float() - 1.5 * n).abs().max() <= 4 * math.sqrt(3 * n * 0.25), counts
    for key in default:
        if key != "lum_space":
            assert torch.equal(default[key], some[key]), key
    # the synthesizer draws with its configuration's spaces
    drawn = sb._draw_perlin_paste(gen(5), 64, 3, dataclasses.replace(CFG, brightness_spaces=["HSV"]), CPU)
    assert (drawn["aug_lum_space"] == 1).all()


def test_perlin_paste_blends_texture_inside_mask() -> None:
    size, bsz = 48, 6
    cfg = dataclasses.replace(CFG, perlin_threshold=0.2)  # large masks
    images = make_batch(bsz, size, seed=1)
    textures = make_batch(3, size, seed=2)
    p = sb._draw_perlin_paste(gen(3), bsz, 3, cfg, CPU)
    # Identity augmenters: no flip, no solarisation, posterize keeping all 8 bits.
    p["aug_chosen"] = torch.tensor([[AUGMENTER_NAMES.index(n) for n in ("fliplr", "solarize", "posterize")]] * bsz)
    p["aug_flip"] = torch.zeros(bsz, 3, dtype=torch.bool)
    p["aug_solarize"] = torch.zeros(bsz, 3, dtype=torch.bool)
    p["aug_bits"] = torch.full((bsz, 3), 8)
    out, mask = sb._perlin_paste(images, textures, p, cfg, False)
    assert mask.any(dim=(1, 2, 3)).all()
    tex = textures[p["texture"]].double().numpy()
    beta = p["beta"].double().numpy().reshape(-1, 1, 1, 1)
    want = np.clip((1.0 - beta) * tex + beta * images.double().numpy(), 0, 255).astype(np.uint8)
    want = np.where(mask.numpy(), want, images.numpy())
    assert np.abs(out.numpy().astype(int) - want).max() <= 1
    assert (p["beta"] <= cfg.blend_max).all() and (p["beta"] >= 0).all()


# --------------------------------------------------------------------------------------------------------------------
# Texture pools and the texture bank
# --------------------------------------------------------------------------------------------------------------------


def test_texture_pool_per_call_and_errors() -> None:
    images = make_batch(4, 32)
    pool = make_batch(2, 32, seed=1)
    syn = BatchSynthesizer(CFG)
    with pytest.raises(ValueError, match="no texture bank"):
        syn(images, gen(0))
    a = syn.details(images, gen(0), textures=pool)
    b = BatchSynthesizer(CFG, pool).details(images, gen(0))
    assert torch.equal(a.image, b.image)
    with pytest.raises(ValueError, match="textures are 64x64"):
        syn(images, gen(0), textures=make_batch(2, 64))
    with pytest.raises(ValueError, match="uint8"):
        syn(images.float(), gen(0), textures=pool)
    with pytest.raises(ValueError, match="square"):
        syn(images[..., :30], gen(0), textures=pool)
    with pytest.raises(DatasetError, match="empty"):
        BatchSynthesizer(CFG, pool[:0])


def test_load_texture_bank(tmp_path: Path, gen_textures: Path) -> None:
    files = sorted(gen_textures.rglob("*.jpg"))[:3]
    assert len(files) == 3
    for i, f in enumerate(files):
        shutil.copy(f, tmp_path / f"{i}_{f.name}")
    for method in ("opencv", "antialias"):
        bank = load_texture_bank(tmp_path, 32, device="cpu", resize=method)
        assert bank.shape == (3, 3, 32, 32) and bank.dtype == torch.uint8
        source = FolderTextures(tmp_path, method)
        for i in range(3):
            assert torch.equal(bank[i], torch.from_numpy(source.load(i, 32)).permute(2, 0, 1))
    res = BatchSynthesizer(dataclasses.replace(CFG, cutpaste_prob=0.0), bank).details(make_batch(4, 32), gen(0))
    assert (res.kind == 2).all()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        load_texture_bank(empty, 32)
    with pytest.raises(DatasetError, match="does not exist"):
        load_texture_bank(tmp_path / "missing", 32)
