"""Exact ROC and precision-recall curves of image scores, score histograms, and their inline SVG charts.

The curves are computed from the scores themselves, with no threshold grid: one sort and cumulative counts at every
distinct score (as `onenip.evaluation.metrics` does), so the trapezoid area of the ROC polyline is the Mann-Whitney AUROC and the
step-wise area of the PR curve the average precision that `onenip.evaluation.metrics` reports for the same scores. Ties between a good
and a defective image give a diagonal ROC segment. Where a curve is undefined (one class only) the chart says why.

The charts are standalone ``<svg>`` elements (300 x 270 px, no script, no external reference) that `onenip.report`
places in its page; their ``data-*`` attributes carry the exact values drawn (area, bin edges and counts, the
threshold a histogram marks), so tests and other tools can read them back. Category names and messages are HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["histogram", "histogram_svg", "pr_curve", "pr_svg", "roc_curve", "roc_svg", "step_ap", "trapezoid_auroc"]

GOOD_COLOUR, BAD_COLOUR, CURVE_COLOUR, THRESHOLD_COLOUR = "#2b7bba", "#d7301f", "#1b3a6b", "#222"
_W, _H = 300, 270  # chart size in pixels
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 12, 34, 42
_PW, _PH = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM


# --------------------------------------------------------------------------------------------------------------------
# Exact curves
# --------------------------------------------------------------------------------------------------------------------


def _counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """True and false positives at every distinct threshold ``score >= t``, thresholds descending; (tp, fp, P, N)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if s.size and np.isnan(s).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y, dtype=np.int64)
    fp = np.cumsum(~y, dtype=np.int64)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.zeros(0, dtype=np.int64)  # end of each tie block
    return tp[last], fp[last], int(y.sum()), int((~y).sum())


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC polyline (FPR, TPR) from (0, 0) to (1, 1): one vertex per distinct score, thresholds descending.

    Tied positives and negatives give a diagonal segment, so the trapezoid area is the Mann-Whitney AUROC that
    `metrics.auroc` computes. Raises ValueError when only one class is present (the curve is undefined).
    """
    tp, fp, n_pos, n_neg = _counts(scores, labels)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the ROC curve needs both good and defective images")
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def trapezoid_auroc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoid area under an ROC polyline."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score down to the first reaching full recall, thresholds descending.

    Step-wise average precision is ``sum((recall[k] - recall[k-1]) * precision[k])`` with recall[-1] = 0 (see
    `step_ap`), equal to `metrics.average_precision`. Raises ValueError when only one class is present.
    """
    tp, fp, n_pos, n_neg = _counts(scores, labels)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the precision-recall curve needs both good and defective images")
    stop = int(np.argmax(tp == n_pos)) + 1  # thresholds below the lowest positive score add nothing
    tp, fp = tp[:stop].astype(np.float64), fp[:stop].astype(np.float64)
    return tp / n_pos, tp / (tp + fp)


def step_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Step-wise area under a precision-recall curve: sum of recall increments times precision."""
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _pr_polyline(recall: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The step function whose area is `step_ap`: from (0, 1), precision[k] held over (recall[k-1], recall[k]]."""
    prev = np.r_[0.0, recall[:-1]]
    x = np.r_[0.0, np.column_stack([prev, recall]).ravel()]
    y = np.r_[1.0, np.repeat(precision, 2)]
    keep = np.r_[True, (np.diff(x) != 0) | (np.diff(y) != 0)]  # drop repeated vertices
    return x[keep], y[keep]


def histogram(good: np.ndarray, defective: np.ndarray, bins: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of good and defective scores on one shared binning: (edges, good counts, defective counts)."""
    both = np.r_[np.asarray(good, dtype=np.float64), np.asarray(defective, dtype=np.float64)]
    if bins is None:
        bins = int(min(30, max(6, math.ceil(math.sqrt(max(both.size, 1))))))
    edges = np.histogram_bin_edges(both if both.size else np.zeros(1), bins=bins)
    return edges, np.histogram(good, bins=edges)[0], np.histogram(defective, bins=edges)[0]


# --------------------------------------------------------------------------------------------------------------------
# SVG
# --------------------------------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    """Compact number for SVG coordinates."""
    return f"{v:.6g}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], int]:
    """About `n` round tick values within [lo, hi] and the decimals to print them with."""
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        return [lo], 3
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    decimals = next(d for d in range(12) if abs(round(step, d) - step) <= 1e-9 * step)  # enough to print `step`
    return ticks, decimals


def _frame(title: str, legend: list[tuple[str, str, str]], xlabel: str, ylabel: str, kind: str, attrs: str) -> list[str]:
    """Opening of a chart: svg element, title, legend entries (colour, css class, text), axis labels, plot frame."""
    out = [f'<svg class="chart {kind}" {attrs} xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
           f'viewBox="0 0 {_W} {_H}" role="img">',
           f"<title>{title}</title>",
           f'<text class="chart-title" x="{_LEFT}" y="13">{title}</text>']
    x = _LEFT
    for colour, cls, text in legend:
        out.append(f'<g class="legend {cls}"><rect x="{x}" y="19" width="10" height="10" fill="{colour}" '
                   f'fill-opacity="0.75"/><text class="legend-text" x="{x + 14}" y="28">{text}</text></g>')
        x += 14 + 6.2 * len(html.unescape(text)) + 12
    out.append(f'<text class="axis-label" x="{_LEFT + _PW / 2}" y="{_H - 6}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text class="axis-label" transform="translate(12 {_TOP + _PH / 2}) rotate(-90)" '
               f'text-anchor="middle">{ylabel}</text>')
    out.append(f'<rect class="plot" x="{_LEFT}" y="{_TOP}" width="{_PW}" height="{_PH}" fill="#fff" stroke="#999"/>')
    return out


def _axes(xticks: Sequence[float], xdec: int, xlo: float, xhi: float,
          yticks: Sequence[float], ydec: int, ylo: float, yhi: float) -> list[str]:
    """Grid lines, tick marks and tick labels of both axes (data ranges [xlo, xhi] x [ylo, yhi])."""
    out = []
    for t in xticks:
        px = _LEFT + (t - xlo) / (xhi - xlo) * _PW if xhi > xlo else _LEFT
        out.append(f'<line class="grid" x1="{px:.2f}" y1="{_TOP}" x2="{px:.2f}" y2="{_TOP + _PH}"/>'
                   f'<line class="tick" x1="{px:.2f}" y1="{_TOP + _PH}" x2="{px:.2f}" y2="{_TOP + _PH + 4}"/>'
                   f'<text class="tick-label" x="{px:.2f}" y="{_TOP + _PH + 15}" text-anchor="middle">{t:.{xdec}f}</text>')
    for t in yticks:
        py = _TOP + _PH - (t - ylo) / (yhi - ylo) * _PH if yhi > ylo else _TOP + _PH
        out.append(f'<line class="grid" x1="{_LEFT}" y1="{py:.2f}" x2="{_LEFT + _PW}" y2="{py:.2f}"/>'
                   f'<line class="tick" x1="{_LEFT - 4}" y1="{py:.2f}" x2="{_LEFT}" y2="{py:.2f}"/>'
                   f'<text class="tick-label" x="{_LEFT - 6}" y="{py + 3.5:.2f}" text-anchor="end">{t:.{ydec}f}</text>')
    return out


def _undefined_chart(kind: str, title: str, attrs: str, why: str) -> str:
    out = _frame(title, [], "", "", kind, attrs)
    out.append(f'<text class="undefined" x="{_LEFT + _PW / 2}" y="{_TOP + _PH / 2}" text-anchor="middle">{why}</text>')
    return "\n".join(out + ["</svg>"])


def _unit_chart(kind: str, title: str, attrs: str, x: np.ndarray, y: np.ndarray, legend: str, xlabel: str,
                ylabel: str, chance: tuple[np.ndarray, np.ndarray]) -> str:
    """A curve in the unit square: the polyline's points are in data units (a transform maps them to pixels)."""
    ticks = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    out = _frame(title, [(CURVE_COLOUR, "curve", legend)], xlabel, ylabel, kind, attrs)
    out += _axes(ticks, 1, 0.0, 1.0, ticks, 1, 0.0, 1.0)
    points = " ".join(f"{_num(a)},{_num(b)}" for a, b in zip(x, y))
    cx = " ".join(f"{_num(a)},{_num(b)}" for a, b in zip(*chance))
    out.append(f'<g class="data" transform="translate({_LEFT} {_TOP + _PH}) scale({_PW} {-_PH})">'
               f'<polyline class="chance" points="{cx}" fill="none" stroke="#aaa" stroke-width="1" '
               f'stroke-dasharray="4 3" vector-effect="non-scaling-stroke"/>'
               f'<polyline class="curve" points="{points}" fill="none" stroke="{CURVE_COLOUR}" stroke-width="2" '
               f'stroke-linejoin="round" vector-effect="non-scaling-stroke"/></g>')
    return "\n".join(out + ["</svg>"])


def roc_svg(cat: str, scores: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    """The ROC chart of one category's image scores (labels 1 = defective) and its trapezoid AUROC (nan, and a chart
    saying why, with one class only)."""
    attrs = f'data-category="{html.escape(cat)}"'
    try:
        fpr, tpr = roc_curve(scores, labels)
    except ValueError as exc:
        return _undefined_chart("roc", "ROC curve", attrs, html.escape(str(exc))), math.nan
    area = trapezoid_auroc(fpr, tpr)
    attrs += f' data-auroc="{area!r}"'
    chance = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    return _unit_chart("roc", "ROC curve", attrs, fpr, tpr, f"AUROC {100 * area:.2f} %", "false positive rate",
                       "true positive rate", chance), area


def pr_svg(cat: str, scores: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    """The precision-recall chart of one category's image scores, with the chance level (the share of defective
    images), and its step-wise AP (nan with one class only)."""
    attrs = f'data-category="{html.escape(cat)}"'
    try:
        recall, precision = pr_curve(scores, labels)
    except ValueError as exc:
        return _undefined_chart("pr", "Precision-recall curve", attrs, html.escape(str(exc))), math.nan
    ap = step_ap(recall, precision)
    attrs += f' data-ap="{ap!r}"'
    x, y = _pr_polyline(recall, precision)
    prevalence = float(np.mean(labels))
    chance = (np.array([0.0, 1.0]), np.array([prevalence, prevalence]))
    return _unit_chart("pr", "Precision-recall curve", attrs, x, y, f"AP {100 * ap:.2f} %", "recall", "precision",
                       chance), ap


def histogram_svg(cat: str, scores: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> str:
    """Histograms of the good and the defective images' scores of one category on one shared binning.

    With a `threshold` (the model's decision threshold of the category, on the same scores) a vertical line marks it,
    labelled and named in the title; the x range is widened to include it when it lies outside the scores (the bins
    stay those of the scores). A missing or non-finite threshold draws nothing.
    """
    good, bad = scores[labels == 0], scores[labels == 1]
    edges, gc, bc = histogram(good, bad)
    if threshold is not None and not math.isfinite(float(threshold)):
        threshold = None
    attrs = (f'data-category="{html.escape(cat)}" data-edges="{" ".join(_num(v) for v in edges)}" '
             f'data-good="{" ".join(str(int(v)) for v in gc)}" data-defective="{" ".join(str(int(v)) for v in bc)}"')
    title = "Image scores"
    if threshold is not None:
        threshold = float(threshold)
        attrs += f' data-threshold="{threshold!r}"'
        title = f"Image scores, threshold {threshold:.4g}"
    legend = [(GOOD_COLOUR, "good", f"good ({good.size})"), (BAD_COLOUR, "defective", f"defective ({bad.size})")]
    out = _frame(title, legend, "image score", "images", "hist", attrs)
    xlo, xhi = float(edges[0]), float(edges[-1])
    if threshold is not None and not xlo <= threshold <= xhi:  # widen the x range (a margin beyond the line)
        pad = 0.05 * (max(xhi, threshold) - min(xlo, threshold))
        xlo, xhi = (threshold - pad, xhi) if threshold < xlo else (xlo, threshold + pad)
    top = max(1, int(max(gc.max(initial=0), bc.max(initial=0))))
    yticks, _ = _nice_ticks(0, top, 4)
    yticks = [t for t in yticks if abs(t - round(t)) < 1e-9] or [0.0]
    yhi = max(float(top), yticks[-1])
    xticks, xdec = _nice_ticks(xlo, xhi, 4)
    out += _axes(xticks, xdec, xlo, xhi, yticks, 0, 0.0, yhi)
    for counts, colour, cls in ((gc, GOOD_COLOUR, "good"), (bc, BAD_COLOUR, "defective")):
        bars = []
        for k, c in enumerate(counts):
            if c == 0:
                continue
            x0 = _LEFT + (edges[k] - xlo) / (xhi - xlo) * _PW
            x1 = _LEFT + (edges[k + 1] - xlo) / (xhi - xlo) * _PW
            h = c / yhi * _PH
            bars.append(f'<rect x="{x0:.2f}" y="{_TOP + _PH - h:.2f}" width="{max(x1 - x0, 0.5):.2f}" '
                        f'height="{h:.2f}"><title>{cls}: {int(c)} in [{edges[k]:.4g}, {edges[k + 1]:.4g}]</title></rect>')
        out.append(f'<g class="bars {cls}" fill="{colour}" fill-opacity="0.55" stroke="{colour}" '
                   f'stroke-width="0.6">{"".join(bars)}</g>')
    if threshold is not None:
        px = _LEFT + (threshold - xlo) / (xhi - xlo) * _PW
        px = min(max(px, _LEFT), _LEFT + _PW)  # within the plot, whatever the rounding
        right = px > _LEFT + _PW / 2  # the label on the side with more room
        lx = px - 3 if right else px + 3
        out.append(f'<g class="threshold"><line class="threshold-line" x1="{px:.2f}" y1="{_TOP}" x2="{px:.2f}" '
                   f'y2="{_TOP + _PH}" stroke="{THRESHOLD_COLOUR}" stroke-width="1.5" stroke-dasharray="5 3">'
                   f'<title>threshold {threshold:.6g}: scores above it are anomalous</title></line>'
                   f'<text class="threshold-label" x="{lx:.2f}" y="{_TOP + 11}" fill="{THRESHOLD_COLOUR}" '
                   f'text-anchor="{"end" if right else "start"}">threshold</text></g>')
    return "\n".join(out + ["</svg>"])
