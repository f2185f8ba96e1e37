"""Exact anomaly-detection metrics computed by sorting, never by looping over thresholds.

Image level (one score per image) and pixel level (one anomaly map per image) metrics:

* ``auroc`` -- area under the ROC curve, identical to the trapezoid ROC area of ``sklearn.metrics.roc_auc_score``
  (ties between a positive and a negative count 1/2: the Mann-Whitney statistic).
* ``average_precision`` -- step-wise average precision, identical to ``sklearn.metrics.average_precision_score``.
* ``f1_max`` -- the best F1 over all thresholds ``score >= t`` and the threshold reaching it.
* ``aupro`` -- the MVTec AD per-region-overlap curve integrated up to a false positive rate limit.

How it is fast. Recall (and PRO) change only at the scores of positive samples, and at every threshold ``t`` the
curves need just two counts: positives with score ``>= t`` and negatives with score ``>= t`` (``> t`` for the exact
tie segments of the PRO curve). So the negatives are sorted once with ``np.sort`` (numpy's SIMD sort, far faster than
``argsort``), the positives are sorted on their own (with their region weights for AUPRO), and both counts at every
distinct positive score come from ``np.searchsorted`` into the sorted negatives: ``side="left"`` gives the negatives
``< t``, ``side="right"`` the negatives ``<= t``. Every metric then costs O(distinct positive scores) on small arrays.
The big arrays stay in their own dtype (no float64 copies); counts are int64, AUROC is an exact integer rank sum.

Degenerate inputs. When only one class is present (no positives or no negatives), AUROC, AP and F1 are undefined
and returned as ``nan`` (so is the F1 threshold); AUPRO is ``nan`` without positive pixels (no region) or without
negative pixels (no false positive rate). Scores are never flipped (no ``1 - AUROC``). NaN scores raise
``ValueError``; ``+-inf`` scores are ordinary, orderable values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "aupro",
    "auroc",
    "average_precision",
    "binary_metrics",
    "f1_max",
    "image_metrics",
    "pixel_metrics",
]

# 8-connectivity inside each image and none across images: labelling an (N, H, W) stack with this structure labels
# every image on its own in a single call.
_STACK_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_STACK_8_CONNECTIVITY[1] = True

# Beyond this, P * N could overflow the int64 rank sum; AUROC then falls back to float64 sums.
_INT64_SAFE = 2**62


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------


def _as_scores(values: object, name: str) -> np.ndarray:
    """Return ``values`` as a real numeric array (no copy when possible); raise ``ValueError`` on NaN or bad dtypes."""
    arr = np.asarray(values)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.floating) and np.isnan(arr.min()):  # min() propagates NaN, no copy
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        raise ValueError(
            f"{name} contains {n_nan} NaN value(s) out of {arr.size}; metrics are undefined with NaN scores"
        )
    return arr


def _as_labels(values: object, name: str, shape: tuple[int, ...], scores_name: str) -> np.ndarray:
    """Return 0/1 labels as a bool array of ``shape``; raise ``ValueError`` on other values or a shape mismatch."""
    arr = np.asarray(values)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape} but {scores_name} has shape {shape}; they must match")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be a bool or 0/1 numeric array, got dtype {arr.dtype}")
    positive = arr == 1
    if not np.all(positive | (arr == 0)):
        bad = np.unique(arr[~(positive | (arr == 0))])[:5]
        raise ValueError(f"{name} must contain only 0 and 1, found e.g. {bad.tolist()} (binarise first, e.g. mask > 0)")
    return positive


def _as_maps_and_masks(maps: object, masks: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, H, W) (or one (H, W)) anomaly maps and ground-truth masks; return (maps, bool masks), both 3-D."""
    m = _as_scores(maps, "maps")
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {m.shape} (squeeze any channel axis first)")
    gt = np.asarray(masks)
    if gt.ndim == 2:
        gt = gt[None]
    return m, _as_labels(gt, "masks", m.shape, "maps")


def _check_fpr_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


# ----------------------------------------------------------------------------------------------------------------------
# Shared core: sorted negatives, distinct positive scores and counts there
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Steps:
    """Counts at every distinct positive score ``values[k]`` (ascending), from one sort of each class.

    ``pos_lt[k]`` positives with score < values[k]; ``neg_lt[k]`` / ``neg_le[k]`` negatives with score < / <=
    values[k]. ``pos_weight_ge[k]`` (AUPRO only) is the summed region weight of the positives with score >= values[k].
    """

    values: np.ndarray
    pos_lt: np.ndarray
    neg_lt: np.ndarray
    neg_le: np.ndarray
    n_pos: int
    n_neg: int
    pos_weight_ge: np.ndarray | None = None

    @property
    def defined(self) -> bool:
        """Both classes present, so every metric is defined."""
        return self.n_pos > 0 and self.n_neg > 0

    @property
    def pos_count(self) -> np.ndarray:
        """Number of positives with score exactly ``values[k]``."""
        return np.diff(self.pos_lt, append=self.n_pos)


def _steps(negatives: np.ndarray, positives: np.ndarray, weights: np.ndarray | None = None) -> _Steps:
    """Build ``_Steps`` from the scores of each class (1-D). Sorts ``negatives`` in place.

    ``negatives`` must be an array this module owns (a fresh copy from boolean indexing). ``weights``, aligned with
    ``positives``, asks for the cumulative weights AUPRO needs (positives are then argsorted, else just sorted).
    """
    negatives.sort()
    if weights is None:
        pos = np.sort(positives)
        w_sorted = None
    else:
        order = np.argsort(positives)
        pos = positives[order]
        w_sorted = weights[order]
    n_pos, n_neg = int(pos.size), int(negatives.size)
    if n_pos == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Steps(pos, empty, empty, empty, 0, n_neg, None if weights is None else np.zeros(0))
    is_new = np.empty(n_pos, dtype=bool)
    is_new[0] = True
    np.not_equal(pos[1:], pos[:-1], out=is_new[1:])
    pos_lt = np.flatnonzero(is_new).astype(np.int64, copy=False)
    values = pos[pos_lt]
    neg_lt = np.searchsorted(negatives, values, side="left").astype(np.int64, copy=False)
    neg_le = np.searchsorted(negatives, values, side="right").astype(np.int64, copy=False)
    weight_ge = None
    if w_sorted is not None:
        # Suffix sums, accurate at the top of the curve (where the AUPRO integral lives).
        weight_ge = np.cumsum(w_sorted[::-1], dtype=np.float64)[::-1][pos_lt]
    return _Steps(values, pos_lt, neg_lt, neg_le, n_pos, n_neg, weight_ge)


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the negatives (a fresh, writable copy) and of the positives, flattened."""
    return scores[~labels], scores[labels]


def _auroc_from(steps: _Steps) -> float:
    """Mann-Whitney AUROC: P(score_pos > score_neg) + 1/2 P(tie), exact integer rank sum."""
    if not steps.defined:
        return math.nan
    count = steps.pos_count
    ties = steps.neg_le - steps.neg_lt
    if steps.n_pos * steps.n_neg < _INT64_SAFE // 2:
        twice_u = 2 * int(np.dot(count, steps.neg_lt)) + int(np.dot(count, ties))
        return twice_u / (2 * steps.n_pos * steps.n_neg)
    cf = count.astype(np.float64)
    u = float(np.dot(cf, steps.neg_lt.astype(np.float64)) + 0.5 * np.dot(cf, ties.astype(np.float64)))
    return u / (float(steps.n_pos) * float(steps.n_neg))


def _tp_fp(steps: _Steps) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at each threshold ``score >= values[k]``, as float64."""
    tp = (steps.n_pos - steps.pos_lt).astype(np.float64)
    fp = (steps.n_neg - steps.neg_lt).astype(np.float64)
    return tp, fp


def _ap_from(steps: _Steps) -> float:
    """Step-wise AP: sum over thresholds of (recall increase) * precision; recall rises only at positive scores."""
    if not steps.defined:
        return math.nan
    tp, fp = _tp_fp(steps)
    return float(np.dot(steps.pos_count, tp / (tp + fp)) / steps.n_pos)


def _f1_from(steps: _Steps) -> tuple[float, float]:
    """Max F1 = 2 TP / (TP + FP + P); for thresholds between positive scores F1 is lower, so these suffice."""
    if not steps.defined:
        return math.nan, math.nan
    tp, fp = _tp_fp(steps)
    f1 = 2.0 * tp / (tp + fp + steps.n_pos)
    best = int(np.argmax(f1))  # values ascending: the lowest threshold reaching the maximum
    return float(f1[best]), float(steps.values[best])


def _pro_curve(steps: _Steps) -> tuple[np.ndarray, np.ndarray]:
    """The exact (FPR, PRO) polyline, FPR non-decreasing, from (0, 0) to (1, 1).

    Going down through the distinct positive scores u (descending): just above u the curve is at
    (FPR(> u), PRO(> u)); at u it moves in a straight segment to (FPR(>= u), PRO(>= u)) -- vertical when no negative
    ties u, diagonal when some do. Between two positive scores only negatives are crossed: PRO is constant, so the
    horizontal run needs no intermediate vertex. After the lowest positive score PRO is 1 up to FPR 1.
    """
    assert steps.pos_weight_ge is not None
    k = steps.values.size
    n_neg = float(steps.n_neg)
    fpr_ge = (steps.n_neg - steps.neg_lt)[::-1] / n_neg
    fpr_gt = (steps.n_neg - steps.neg_le)[::-1] / n_neg
    # The weights (1 / region area) sum to the number of regions; dividing by their computed sum instead makes the
    # last PRO exactly 1 despite rounding.
    pro_ge = steps.pos_weight_ge[::-1] / steps.pos_weight_ge[0]
    x = np.empty(2 * k + 2, dtype=np.float64)
    y = np.empty(2 * k + 2, dtype=np.float64)
    x[0] = y[0] = 0.0
    x[1 : 2 * k + 1 : 2] = fpr_gt
    x[2 : 2 * k + 2 : 2] = fpr_ge
    y[1] = 0.0
    y[3 : 2 * k + 1 : 2] = pro_ge[:-1]
    y[2 : 2 * k + 2 : 2] = pro_ge
    x[-1] = y[-1] = 1.0
    return x, y


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x non-decreasing) from x[0] to ``limit``, interpolating linearly there."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    full = x1 <= limit
    area = 0.5 * float(np.dot(x1[full] - x0[full], y0[full] + y1[full]))
    cut = np.flatnonzero((x0 < limit) & (x1 > limit))  # at most one segment, since x is non-decreasing
    if cut.size:
        i = int(cut[0])
        y_limit = y0[i] + (y1[i] - y0[i]) * (limit - x0[i]) / (x1[i] - x0[i])
        area += 0.5 * float((limit - x0[i]) * (y0[i] + y_limit))
    return area


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """For every positive pixel (in ``masks[masks]`` order) 1 / area of its region, as float64.

    Regions are the 8-connected components of each image's mask (never joined across images).
    """
    regions, n_regions = ndimage.label(masks, structure=_STACK_8_CONNECTIVITY)
    region_of_pixel = regions[masks]
    area = np.bincount(region_of_pixel, minlength=n_regions + 1)
    inverse_area = np.zeros(n_regions + 1, dtype=np.float64)
    inverse_area[1:] = 1.0 / area[1:]
    return inverse_area[region_of_pixel]


def _aupro_from(steps: _Steps, fpr_limit: float) -> float:
    if not steps.defined:  # no positive pixel (hence no region) or no negative pixel
        return math.nan
    x, y = _pro_curve(steps)
    return float(_area_to(x, y, fpr_limit) / fpr_limit)


def _binary_steps(scores: object, labels: object) -> _Steps:
    s = _as_scores(scores, "scores")
    y = _as_labels(labels, "labels", s.shape, "scores")
    negatives, positives = _split(s.ravel(), y.ravel())
    return _steps(negatives, positives)


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; higher score = more anomalous, label 1 = anomalous.

    Equal to ``sklearn.metrics.roc_auc_score`` (trapezoid ROC; ties between classes count 1/2), computed exactly as
    the Mann-Whitney rank sum. ``nan`` when only one class is present.

    Args:
        scores: real scores, any shape.
        labels: 0/1 (or bool) labels of the same shape.
    """
    return _auroc_from(_binary_steps(scores, labels))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise average precision, equal to ``sklearn.metrics.average_precision_score``; ``nan`` with one class."""
    return _ap_from(_binary_steps(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds (predict anomalous when ``score >= t``) and the threshold ``t`` reaching it.

    The threshold is a score of a positive sample, the lowest one reaching the maximum. ``(nan, nan)`` with one class.
    """
    return _f1_from(_binary_steps(scores, labels))


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC, AP, F1-max and its threshold from one shared sort.

    Keys ``auroc``, ``ap``, ``f1_max``, ``f1_threshold``; all ``nan`` when only one class is present.
    """
    steps = _binary_steps(scores, labels)
    f1, threshold = _f1_from(steps)
    return {"auroc": _auroc_from(steps), "ap": _ap_from(steps), "f1_max": f1, "f1_threshold": threshold}


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image-level metrics (one score per image): keys ``auroc``, ``ap``, ``f1_max``."""
    result = binary_metrics(scores, labels)
    return {"auroc": result["auroc"], "ap": result["ap"], "f1_max": result["f1_max"]}


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD definition).

    Regions are the 8-connected components of each image's ground-truth mask. At threshold ``t``, PRO(t) is the mean
    over all regions of all images of the fraction of the region's pixels with ``map >= t``, and FPR(t) the fraction
    of all negative pixels with ``map >= t``. The exact curve through every distinct threshold (with the straight
    segments where positives and negatives tie) is integrated by the trapezoid rule from FPR 0 to ``fpr_limit``
    (linear interpolation there) and divided by ``fpr_limit``, so a perfect map scores 1.

    Args:
        maps: (N, H, W) anomaly maps (float32 recommended; never copied to float64). One (H, W) map is accepted.
        masks: (N, H, W) bool (or 0/1) ground truth of the same shape.
        fpr_limit: upper integration limit, in (0, 1].

    Returns:
        The normalised area; ``nan`` when there are no positive pixels or no negative pixels.
    """
    limit = _check_fpr_limit(fpr_limit)
    m, gt = _as_maps_and_masks(maps, masks)
    weights = _region_weights(gt)
    negatives, positives = _split(m, gt)
    return _aupro_from(_steps(negatives, positives, weights), limit)


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max and AUPRO over all pixels of all maps, sharing one sort of each class.

    See ``auroc``, ``average_precision``, ``f1_max`` (computed on the flattened maps and masks) and ``aupro``.
    Returns keys ``auroc``, ``ap``, ``f1_max``, ``aupro``; all ``nan`` when only one class of pixels is present.
    """
    limit = _check_fpr_limit(fpr_limit)
    m, gt = _as_maps_and_masks(maps, masks)
    weights = _region_weights(gt)
    negatives, positives = _split(m, gt)
    steps = _steps(negatives, positives, weights)
    return {
        "auroc": _auroc_from(steps),
        "ap": _ap_from(steps),
        "f1_max": _f1_from(steps)[0],
        "aupro": _aupro_from(steps, limit),
    }
