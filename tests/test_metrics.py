"""Tests of onenip.metrics against scikit-learn (AUROC, AP, F1) and a brute-force AUPRO written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from onenip.evaluation import metrics
from onenip.evaluation.metrics import (
    aupro,
    auroc,
    average_precision,
    binary_metrics,
    f1_max,
    image_metrics,
    pixel_metrics,
)

TIE_MODES = ("continuous", "round1", "integer", "all_equal")


def _binary_case(seed: int, n: int, pos_fraction: float, ties: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels with both classes present; positives score higher on average."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < pos_fraction
    labels[0], labels[1] = True, False
    scores = rng.normal(size=n) + 0.8 * labels
    if ties == "round1":
        scores = np.round(scores / 4, 1)
    elif ties == "integer":
        scores = np.round(scores).astype(np.int64)
    elif ties == "all_equal":
        scores = np.full(n, 0.25)
    else:
        scores = scores.astype(np.float32)
    return scores, labels


def _f1_reference(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


# ----------------------------------------------------------------------------------------------------------------------
# AUROC / AP / F1 against scikit-learn
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", TIE_MODES)
@pytest.mark.parametrize("pos_fraction", [0.02, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("n", [2, 7, 100, 3000])
@pytest.mark.parametrize("seed", range(4))
def test_binary_metrics_match_sklearn(seed: int, n: int, pos_fraction: float, ties: str) -> None:
    scores, labels = _binary_case(seed, n, pos_fraction, ties)
    expected_auroc = roc_auc_score(labels, scores)
    expected_ap = average_precision_score(labels, scores)
    expected_f1 = _f1_reference(scores, labels)

    assert auroc(scores, labels) == pytest.approx(expected_auroc, abs=1e-6)
    assert average_precision(scores, labels) == pytest.approx(expected_ap, abs=1e-6)
    f1, threshold = f1_max(scores, labels)
    assert f1 == pytest.approx(expected_f1, abs=1e-6)

    # The threshold really reaches the maximum with the rule "score >= t".
    predicted = scores >= threshold
    tp = np.count_nonzero(predicted & labels)
    assert 2 * tp / (np.count_nonzero(predicted) + np.count_nonzero(labels)) == pytest.approx(f1, abs=1e-12)

    shared = binary_metrics(scores, labels)
    assert set(shared) == {"auroc", "ap", "f1_max", "f1_threshold"}
    assert shared["auroc"] == pytest.approx(expected_auroc, abs=1e-6)
    assert shared["ap"] == pytest.approx(expected_ap, abs=1e-6)
    assert shared["f1_max"] == pytest.approx(expected_f1, abs=1e-6)
    assert shared["f1_threshold"] == threshold


@pytest.mark.parametrize("seed", range(10))
def test_many_seeds_mixed_ties(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 2000))
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, int(rng.integers(1, 30)), size=n) * 0.5 + 0.3 * labels  # ints, dense ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert f1_max(scores, labels)[0] == pytest.approx(_f1_reference(scores, labels), abs=1e-6)


def test_all_equal_scores_values() -> None:
    labels = np.array([1, 0, 0, 1, 0])
    scores = np.zeros(5)
    assert auroc(scores, labels) == 0.5
    assert average_precision(scores, labels) == pytest.approx(2 / 5)
    # One threshold: everything predicted positive, P = 2/5, R = 1, F1 = 2 * 0.4 / 1.4.
    assert f1_max(scores, labels) == (pytest.approx(0.8 / 1.4), 0.0)


def test_inverted_scores_are_not_flipped() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    assert auroc(scores, labels) == 0.0


def test_float_fallback_of_rank_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 path used when P * N could overflow int64 gives the same AUROC."""
    scores, labels = _binary_case(7, 2000, 0.3, "round1")
    monkeypatch.setattr(metrics, "_INT64_SAFE", 0)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_image_metrics_keys_and_values() -> None:
    scores, labels = _binary_case(3, 200, 0.4, "continuous")
    result = image_metrics(scores, labels.astype(np.int32))
    assert set(result) == {"auroc", "ap", "f1_max"}
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert result["f1_max"] == pytest.approx(_f1_reference(scores, labels), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# AUPRO against brute force
# ----------------------------------------------------------------------------------------------------------------------


def _aupro_brute_force(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Straight from the definition: every distinct threshold, every region, then the clipped trapezoid."""
    regions: list[np.ndarray] = []
    for image, mask in zip(maps, masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions.extend(image[labelled == r] for r in range(1, n + 1))
    negatives = maps[~masks]
    xs, ys = [0.0], [0.0]  # threshold +inf
    for t in np.unique(maps)[::-1]:  # consecutive points joined by straight lines: includes the tie segments
        xs.append(np.count_nonzero(negatives >= t) / negatives.size)
        ys.append(float(np.mean([np.count_nonzero(region >= t) / region.size for region in regions])))
    assert xs[-1] == 1.0 and ys[-1] == 1.0
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def _blob_case(seed: int, ties: str, size: int = 16, n_maps: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Small maps with blob masks: several regions per image, one defect-free image, masks overlapping across images."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n_maps, size, size)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    masks[1] = False  # an image without defect
    masks[2, 1, 1] = masks[2, 2, 2] = True  # two diagonal neighbours: one region under 8-connectivity
    masks[3, size - 2 :, :3] = True  # a small extra region
    maps = rng.normal(size=masks.shape) + 1.2 * masks + 0.4 * rng.normal(size=(n_maps, 1, 1))
    if ties == "round1":
        maps = np.round(maps, 1)
    elif ties == "integer":
        maps = np.round(maps)
    elif ties == "all_equal":
        maps = np.zeros_like(maps)
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("ties", TIE_MODES)
@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force(seed: int, ties: str, fpr_limit: float) -> None:
    maps, masks = _blob_case(seed, ties)
    assert ndimage.label(masks[0], structure=np.ones((3, 3)))[1] >= 1
    expected = _aupro_brute_force(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)
    assert pixel_metrics(maps, masks, fpr_limit)["aupro"] == pytest.approx(expected, abs=1e-9)


def test_aupro_multiple_regions_sizes() -> None:
    maps, masks = _blob_case(11, "round1", size=32, n_maps=6)
    assert aupro(maps, masks) == pytest.approx(_aupro_brute_force(maps, masks, 0.3), abs=1e-9)


def test_aupro_perfect_map_is_one() -> None:
    _, masks = _blob_case(0, "continuous")
    maps = masks.astype(np.float32)
    assert aupro(maps, masks) == 1.0
    assert aupro(maps, masks, fpr_limit=1.0) == 1.0


@pytest.mark.parametrize("fpr_limit", [0.3, 0.1, 1.0])
def test_aupro_constant_map(fpr_limit: float) -> None:
    # One distinct value: the only thresholds are +inf -> (FPR, PRO) = (0, 0) and the constant -> (1, 1). The curve is
    # the diagonal PRO = FPR, its area from 0 to L is L^2 / 2, normalised by L: L / 2 (0.15 for the default 0.3).
    _, masks = _blob_case(1, "continuous")
    maps = np.full(masks.shape, 0.7, dtype=np.float32)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(fpr_limit / 2, abs=1e-12)


def test_aupro_tie_segment_by_hand() -> None:
    # One image, one region of 2 pixels (scores 0.9 and 0.5) and 8 negatives (4 at 0.5, 4 at 0.1).
    # Thresholds: 0.9 -> (FPR 0, PRO 1/2); 0.5 -> (4/8, 1); 0.1 -> (1, 1). The segment from (0, .5) to (.5, 1) is the
    # tie diagonal; at FPR 0.3 it is at PRO 0.5 + 0.5 * 0.3 / 0.5 = 0.8. Area = 0.3 * (0.5 + 0.8) / 2 = 0.195, / 0.3.
    maps = np.array([[[0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1]]], dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, :2] = True
    assert aupro(maps, masks) == pytest.approx(0.65, abs=1e-12)


def test_aupro_regions_are_per_image() -> None:
    # Image 0: region of 1 pixel at (5, 5), detected (score 1). Image 1: 2x2 region covering (5, 5), missed (score 0).
    # Per image: at t = 1 PRO = (1 + 0) / 2 = 0.5, FPR = 0; then (1, 1). Area to L: 0.5 L + 0.25 L^2, / L = 0.5 + 0.25 L
    # = 0.575 for L = 0.3. (Regions joined across images would give one region of 5 pixels: 0.2 + 0.4 L = 0.32.)
    masks = np.zeros((2, 12, 12), dtype=bool)
    masks[0, 5, 5] = True
    masks[1, 5:7, 5:7] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0][masks[0]] = 1.0
    assert aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # One pixel (2, 2) touching a 2x2 blob at (3..4, 3..4) only diagonally: one region of 5 pixels under
    # 8-connectivity. Only (2, 2) is detected: PRO(1) = 1/5, so aupro = 0.2 + 0.4 L = 0.32 for L = 0.3
    # (4-connectivity would give two regions, PRO(1) = 1/2 and 0.575).
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2, 2] = True
    masks[0, 3:5, 3:5] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 2, 2] = 1.0
    assert aupro(maps, masks) == pytest.approx(0.32, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# pixel_metrics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", ["continuous", "round1", "integer"])
@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn_on_flattened(seed: int, ties: str) -> None:
    maps, masks = _blob_case(seed, ties, size=24, n_maps=5)
    result = pixel_metrics(maps, masks)
    assert set(result) == {"auroc", "ap", "f1_max", "aupro"}
    flat_maps, flat_masks = maps.ravel(), masks.ravel()
    assert result["auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-6)
    assert result["ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-6)
    assert result["f1_max"] == pytest.approx(_f1_reference(flat_maps, flat_masks), abs=1e-6)
    assert result["aupro"] == pytest.approx(aupro(maps, masks), abs=1e-12)


def test_pixel_metrics_dtypes_agree() -> None:
    maps, masks = _blob_case(5, "round1", size=20)
    base = pixel_metrics(maps, masks)
    for other_maps, other_masks in [(maps.astype(np.float64), masks.astype(np.uint8)), (maps, masks.astype(np.int64))]:
        other = pixel_metrics(other_maps, other_masks)
        for key in base:
            assert other[key] == pytest.approx(base[key], abs=1e-9)
    # One (H, W) map is one image.
    single = pixel_metrics(maps[0], masks[0])
    assert single["auroc"] == pytest.approx(roc_auc_score(masks[0].ravel(), maps[0].ravel()), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Degenerate and invalid inputs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan(label: int) -> None:
    scores = np.linspace(0, 1, 9)
    labels = np.full(9, label)
    assert math.isnan(auroc(scores, labels))
    assert math.isnan(average_precision(scores, labels))
    assert all(math.isnan(v) for v in f1_max(scores, labels))
    assert all(math.isnan(v) for v in binary_metrics(scores, labels).values())
    assert all(math.isnan(v) for v in image_metrics(scores, labels).values())
    maps = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    masks = np.full(maps.shape, bool(label))
    assert math.isnan(aupro(maps, masks))
    assert all(math.isnan(v) for v in pixel_metrics(maps, masks).values())


def test_empty_input_gives_nan() -> None:
    assert math.isnan(auroc(np.zeros(0), np.zeros(0, dtype=bool)))


def test_nan_scores_raise() -> None:
    scores = np.array([0.1, np.nan, 0.3, 0.4])
    labels = np.array([0, 1, 0, 1])
    for fn in (auroc, average_precision, f1_max, binary_metrics, image_metrics):
        with pytest.raises(ValueError, match="NaN"):
            fn(scores, labels)
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[1, 2, 3] = np.nan
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, 0] = True
    for fn in (aupro, pixel_metrics):
        with pytest.raises(ValueError, match="maps contains 1 NaN"):
            fn(maps, masks)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        auroc(np.arange(3.0), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        auroc(np.arange(3.0), np.array([0, 1]))
    with pytest.raises(ValueError, match="masks"):
        pixel_metrics(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 1, 4, 4), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros((1, 4, 4), np.float32), np.eye(4, dtype=bool)[None], fpr_limit=0.0)
    with pytest.raises(ValueError, match="numeric"):
        auroc(np.array(["a", "b"]), np.array([0, 1]))
