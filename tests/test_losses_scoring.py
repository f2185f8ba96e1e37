"""Losses (§5) and scoring (§6): Dice as the reference computes it, MSE, fusion and the pooled-max image score."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onenip.models.networks import upsample
from onenip.models.scoring import (
    added_type_bank,
    bank_size,
    coreset,
    fuse,
    fusion_scale,
    image_scores,
    pad_banks,
    patch_distances,
    prompt_distances,
    prompt_map,
    type_bank,
    type_banks,
)
from onenip.training.losses import dice_loss, feature_mse


def test_dice_reference_form_has_no_factor_two() -> None:
    g = torch.zeros(1, 1, 8, 8)
    g[..., 2:6, 2:6] = 1  # 16 defect pixels
    perfect = torch.where(g > 0, 50.0, -50.0)  # sigmoid ~ the mask
    # reference: 1 - (16 + 1) / (16 + 16 + 1) = 16/33; standard: 1 - (32 + 1) / 33 = 0
    assert dice_loss(perfect, g).item() == pytest.approx(16 / 33, abs=1e-6)
    assert dice_loss(perfect, g, standard=True).item() == pytest.approx(0.0, abs=1e-6)
    # a normal sample (empty mask) predicted empty costs nothing; predicted full costs almost 1
    empty = torch.zeros_like(g)
    assert dice_loss(torch.full_like(g, -50.0), empty).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.full_like(g, 50.0), empty).item() == pytest.approx(1 - 1 / 65, abs=1e-6)


def test_dice_is_mean_over_samples() -> None:
    g = torch.zeros(2, 1, 4, 4)
    g[1, 0, :2, :2] = 1
    logits = torch.randn(2, 1, 4, 4)
    both = dice_loss(logits, g)
    each = (dice_loss(logits[:1], g[:1]) + dice_loss(logits[1:], g[1:])) / 2
    assert both.item() == pytest.approx(each.item(), rel=1e-6)


def test_feature_mse_is_one_mean_over_both_halves() -> None:
    rec, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    halves = 0.5 * F.mse_loss(rec[:2], target[:2]) + 0.5 * F.mse_loss(rec[2:], target[2:])
    assert feature_mse(rec, target).item() == pytest.approx(halves.item(), rel=1e-6)
    assert feature_mse(rec.bfloat16(), target).dtype == torch.float32


def test_image_score_is_max_of_16x16_mean() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((5, 48, 40)).astype(np.float32)
    maps[2, 10:26, 5:21] += 3.0  # a 16x16 hot block: its mean wins
    ref = F.avg_pool2d(torch.from_numpy(maps)[:, None].double(), 16, stride=1).flatten(1).amax(1).numpy()
    got = image_scores(torch.from_numpy(maps), 16).numpy()  # float32, as every consumer computes it
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert got.argmax() == 2
    # a single hot pixel is diluted by the pooling, unlike a plain maximum
    spot = np.zeros((1, 32, 32), np.float32)
    spot[0, 5, 5] = 256.0
    assert float(image_scores(torch.from_numpy(spot), 16)[0]) == pytest.approx(1.0)


def test_fusion() -> None:
    assert fusion_scale(0.2, 1.8) == pytest.approx(1.0)
    rec, ref = np.full((1, 2, 2), 2.0), np.full((1, 2, 2), 0.5)
    np.testing.assert_allclose(fuse(rec, ref, 0.5, 3.0), 0.5 * 2.0 + 0.5 * 3.0 * 0.5)
    assert fuse(rec, None, 0.5, 3.0) is rec


@pytest.mark.parametrize("shape,size", [((2, 3, 14, 14), 224), ((1, 1, 56, 56), 224), ((2, 1, 7, 5), 9), ((1, 2, 1, 1), 8)])
def test_upsample_is_bilinear_with_aligned_corners(shape: tuple[int, ...], size: int) -> None:
    """The matrix-product upsampling gives F.interpolate's bilinear (align_corners=True) values, any grid."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    assert torch.allclose(upsample(x, size), want, atol=1e-5)


def test_type_banks_pad_without_changing_distances() -> None:
    """Types with fewer prompt patches are brought to the longest bank by repeating their own patches: every query's
    nearest-patch distances equal those against its type's unpadded bank (a zero or foreign pad would change them)."""
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(5, 8, 3, 3, generator=gen).abs()  # 5 prompt images, 8 channels, 3 x 3 patches
    kind = torch.tensor([0, 0, 0, 1, 2])  # type 0 has three images, types 1 and 2 one each
    bank = type_banks(pool, kind, 3)
    assert bank.shape == (3, 27, 8)
    query = -torch.randn(3, 8, 3, 3, generator=gen).abs()  # every cosine to the pool < 0: a zero pad would win
    got = patch_distances(query, bank)  # query i against type i's padded bank
    for k in range(3):
        alone = type_bank(pool[kind == k])[None]
        assert torch.allclose(got[k], patch_distances(query[k : k + 1], alone)[0], atol=1e-6)


def test_patch_distances_keep_a_close_patchs_distance_when_the_product_runs_in_bf16() -> None:
    """A query patch 1e-3 (in cosine distance) from its nearest bank patch: the distance comes out right with the
    matrix product in bf16, where 1 - max(q . b) rounds it to 0 or 2^-8 (how the unknown-type check lost its
    distances in OpenVINO bf16)."""
    gen = torch.Generator().manual_seed(6)
    bank = F.normalize(torch.randn(1, 5, 64, generator=gen), dim=2)  # (N, M, C)
    near = F.normalize(bank[0, 2] + 0.045 * F.normalize(torch.randn(64, generator=gen), dim=0), dim=0)
    want = float(1 - near @ bank[0, 2])
    assert 5e-4 < want < 2e-3
    query = near.view(1, 64, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = float(patch_distances(query, bank)[0, 0])
        rounded = float(1 - (F.normalize(query.flatten(1), dim=1) @ bank[0].T).amax())
    assert got == pytest.approx(want, rel=0.02)
    assert rounded != pytest.approx(want, rel=0.2)  # what the plain form gives here
    assert torch.allclose(patch_distances(query, bank), 1 - (F.normalize(query.flatten(1), dim=1) @ bank[0].T).amax(),
                          atol=1e-6)


def test_prompt_distances_sum_each_taps_nearest_euclidean_distance() -> None:
    """Each tap (unit vectors of its own width) finds its own nearest bank patch; the distances add over the taps. A
    padded bank (a shorter type's patches repeated) gives the same distances."""
    gen = torch.Generator().manual_seed(2)
    widths = [3, 5]

    def unit_taps(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape[:-1], sum(widths), generator=gen)
        return torch.cat([F.normalize(t, dim=-1) for t in x.split(widths, dim=-1)], dim=-1)

    query = unit_taps(2, 4, 4, 8).permute(0, 3, 1, 2)  # (N, C', G, G)
    bank = unit_taps(7, 8)  # (M, C')
    q = query.flatten(2).transpose(1, 2)  # (N, L, C')
    want = sum(torch.cdist(q_tap, b_tap[None].expand(2, -1, -1)).amin(dim=2)
               for q_tap, b_tap in zip(q.split(widths, dim=2), bank.split(widths, dim=1)))
    zero = torch.zeros(2, dtype=torch.int64)
    got = prompt_distances(query, bank[None], zero, widths)
    assert got.shape == (2, 16) and torch.allclose(got, want, atol=1e-4)
    import onenip.models.scoring as scoring

    padded = pad_banks([bank, bank[:3]])  # (2, 7, C'): the second type's 3 patches repeated
    mixed = prompt_distances(query, padded, torch.tensor([1, 0]), widths)  # query 0 against bank 1, query 1 bank 0
    assert torch.allclose(mixed[0], prompt_distances(query[:1], bank[:3][None], zero[:1], widths)[0], atol=1e-6)
    assert torch.allclose(mixed[1], want[1], atol=1e-4)
    chunk, scoring.BANK_CHUNK = scoring.BANK_CHUNK, 3  # the banks compared in chunks of 3, 3 and 1 patches
    try:
        assert torch.allclose(prompt_distances(query, bank[None], zero, widths), want, atol=1e-4)
        assert torch.allclose(prompt_distances(query, padded, torch.tensor([1, 0]), widths), mixed, atol=1e-6)
        assert torch.allclose(prompt_distances(query, padded, torch.tensor([-1, 0]), widths)[1], want[1], atol=1e-4)
    finally:
        scoring.BANK_CHUNK = chunk


def test_bank_size_keeps_a_quarter_but_one_image_at_least_and_four_at_most() -> None:
    assert [bank_size(k, 784) for k in (1, 2, 4, 5, 16, 17, 64)] == [784, 784, 784, 980, 3136, 3136, 3136]
    assert bank_size(3, 64) == 64 and bank_size(1, 1) == 1


def test_coreset_is_k_center_greedy() -> None:
    """Against the greedy written out plainly: from row 0, each next row the farthest from those chosen; on five tight,
    far-apart clusters five rows are one per cluster; every row ends up no farther from a kept row than any two kept
    rows are from each other (the greedy's covering property); all rows when asked for as many."""
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(60, 6, generator=gen)
    chosen = [0]
    for _ in range(9):
        d = torch.cdist(bank, bank[chosen]).amin(dim=1)
        chosen.append(int(d.argmax()))
    got = coreset(bank, 10)
    assert torch.equal(got, bank[chosen])
    kept = torch.cdist(got, got) + torch.eye(10) * 1e9
    assert torch.cdist(bank, got).amin(dim=1).max() <= kept.min() + 1e-6
    centres = torch.eye(6)[:5] * 100
    clusters = (centres[:, None] + 0.01 * torch.randn(5, 8, 6, generator=gen)).reshape(40, 6)
    picked = coreset(clusters[torch.randperm(40, generator=gen)], 5)
    assert sorted(int(v) for v in (picked @ centres.T).argmax(dim=1)) == [0, 1, 2, 3, 4]
    assert torch.equal(coreset(bank, 60), bank) and torch.equal(coreset(bank, 99), bank)
    twice = torch.cat([bank[:3], bank[:3], bank[:3]])  # 3 distinct rows, each three times
    picked = coreset(twice, 7)
    counts = collections.Counter(tuple(r.tolist()) for r in picked)
    assert len(picked) == 7 and len(counts) == 3 and min(counts.values()) >= 2  # distinct rows, not row 0 again


def test_added_type_bank_is_the_coreset_of_the_prompt_patches() -> None:
    patches = torch.randn(8, 5, 4, 4, generator=torch.Generator().manual_seed(5))  # K = 8 images of 4 x 4 patches
    bank = added_type_bank(patches)
    rows = patches.flatten(2).transpose(1, 2).reshape(-1, 5)
    assert bank.shape == (32, 5) and torch.equal(bank, coreset(rows, 32))
    assert torch.equal(added_type_bank(patches[:1]), rows[:16])  # one image: every patch, in order
    assert added_type_bank(torch.randn(3, 5, 4, 6)).shape == (24, 5)  # 4 x 6 patches an image: 24 of 72


@pytest.mark.parametrize("grid,size", [(28, 224), (8, 64), (4, 9)])
def test_prompt_map_is_upsampled_then_gaussian_smoothed(grid: int, size: int) -> None:
    """One matrix per side gives bilinear upsampling (align_corners=True) followed by a Gaussian of sigma = size / 56,
    truncated at 4 sigma and reflected at the borders."""
    d = torch.rand(3, grid * grid, generator=torch.Generator().manual_seed(3))
    up = F.interpolate(d.view(3, 1, grid, grid), size=(size, size), mode="bilinear", align_corners=True)
    sigma = size / 56
    radius = min(int(4 * sigma + 0.5), size - 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-x**2 / (2 * sigma**2))
    g = g / g.sum()
    want = F.conv2d(F.pad(up, (radius, radius, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    want = F.conv2d(F.pad(want, (0, 0, radius, radius), mode="reflect"), g.view(1, 1, -1, 1))[:, 0]
    assert torch.allclose(prompt_map(d, size), want, atol=1e-5)
