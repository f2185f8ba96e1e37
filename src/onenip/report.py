"""`onenip report RUN_DIR`: one self-contained HTML page from the results of a test run.

The page is built from the two files `onenip test` writes (see `evaluate.write_results`): results.json (metrics) and
scores.csv (one image score per test image). It holds

* a header: protocol, checkpoint, fusion constant, prompt retrieval accuracy, number of images, skipped files;
* the false alarms and misses at the model's own thresholds (results.json's `decisions`, when the run has them);
* the per-category table of the seven metrics of one scored map (in %, NaN as an em dash), their mean and the
  pooled image metrics (all test images ranked together);
* per category: the ROC curve and the precision-recall curve of the image scores, computed exactly from scores.csv
  (sort and cumulative counts at every distinct score, as `metrics` does: the AUROC is the trapezoid area of the ROC
  polyline, the AP the step-wise area of the PR curve, so both equal results.json's image_auroc and image_ap), and the
  distribution of the scores of good and defective images (two histograms on a shared binning);
* per category, a gallery of the worst misses: the defective images with the lowest scores and the good images with
  the highest scores, each shown as the deployed model's overlay (anomaly heat map, defect mask outlined) with its
  score, normalised score, decision and retrieved category. Without a usable checkpoint the plain images are shown,
  with a note saying why.

Everything is inline (CSS, SVG charts, images as base64 PNG data URIs): the file can be mailed or archived on its own
and opens without network access. Every string read from a file is HTML-escaped.

    from onenip.report import make_report
    make_report("runs/x/results/clean")          # -> runs/x/results/clean/report.html
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .checkpoint import atomic_write_text
from .errors import DatasetError, OnenipError

__all__ = [
    "ScoreRow", "histogram", "make_report", "pick_gallery", "pr_curve", "read_run", "roc_curve", "step_ap",
    "trapezoid_auroc",
]

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
THUMBNAIL = 256  # longest side, in pixels, of a gallery picture
GOOD_COLOUR, BAD_COLOUR, CURVE_COLOUR = "#2b7bba", "#d7301f", "#1b3a6b"
EM_DASH = "\u2014"


# --------------------------------------------------------------------------------------------------------------------
# Reading a results folder
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreRow:
    """One test image of scores.csv, with the score of the map the report is about."""

    image: str
    category: str
    defect: str
    label: int  # 1 = defective
    retrieved: str  # category of the retrieved prompt ("" under the paper protocol)
    similarity: float | None
    score: float


def _parse_float(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    return float(text)


def read_run(results_dir: str | Path, map_name: str = "fused") -> tuple[dict[str, Any], list[ScoreRow]]:
    """results.json (as a dict) and the rows of scores.csv (scores of `map_name`) of a test run's results folder.

    Raises:
        DatasetError: a file is missing or malformed (naming it and what is wrong).
        OnenipError: `map_name` was not scored in this run (naming the maps that were).
    """
    folder = Path(results_dir)
    if not folder.is_dir():
        raise DatasetError(f"results folder {folder} does not exist (give the folder `onenip test` wrote results.json to)")
    rpath, spath = folder / "results.json", folder / "scores.csv"
    if not rpath.is_file():
        raise DatasetError(f"{rpath} does not exist: {folder} is not a results folder of `onenip test`")
    try:
        data = json.loads(rpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{rpath} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        raise DatasetError(f"{rpath} is malformed: it has no 'categories' object (not written by `onenip test`?)")
    for cat, entry in data["categories"].items():
        if not isinstance(entry, dict):
            raise DatasetError(f"{rpath} is malformed: category {cat!r} is not an object")
    maps = sorted({k for c in data["categories"].values() for k in ("rec", "ref", "fused") if isinstance(c.get(k), dict)})
    if map_name not in maps:
        raise OnenipError(f"map {map_name!r} was not scored in {rpath}; scored maps: {', '.join(maps) or 'none'}")
    for cat, entry in data["categories"].items():
        if map_name in entry:
            missing = [m for m in METRIC_KEYS if m not in entry[map_name]]
            if missing:
                raise DatasetError(f"{rpath} is malformed: category {cat!r} map {map_name!r} lacks {', '.join(missing)}")
    if not spath.is_file():
        raise DatasetError(f"{spath} does not exist: the report needs the per-image scores `onenip test` writes there")
    column = f"score_{map_name}"
    rows: list[ScoreRow] = []
    try:
        with spath.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            needed = ["image", "category", "label", column]
            absent = [c for c in needed if c not in (reader.fieldnames or [])]
            if absent:
                raise DatasetError(f"{spath} is malformed: no column {', '.join(absent)} (header: {reader.fieldnames})")
            for line, rec in enumerate(reader, start=2):
                try:
                    label = {"0": 0, "1": 1, "false": 0, "true": 1}[str(rec["label"]).strip().lower()]
                    score = float(rec[column])
                    sim = _parse_float(rec.get("similarity"))
                except (KeyError, ValueError, TypeError, AttributeError):
                    raise DatasetError(f"{spath} line {line} is malformed: label {rec.get('label')!r}, "
                                       f"{column} {rec.get(column)!r}") from None
                if math.isnan(score):
                    raise DatasetError(f"{spath} line {line}: {column} is NaN")
                rows.append(ScoreRow(image=rec["image"] or "", category=rec["category"] or "", defect=rec.get("defect") or "",
                                     label=label, retrieved=rec.get("retrieved") or "", similarity=sim, score=score))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{spath} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise DatasetError(f"{spath} is not valid CSV: {exc}") from None
    return data, rows


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

_W, _H = 300, 270  # chart size in pixels
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 12, 34, 42
_PW, _PH = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM


def _e(value: Any) -> str:
    """HTML-escape anything read from a file (quotes included, for attributes)."""
    return html.escape(str(value), quote=True)


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


def _roc_svg(cat: str, scores: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    attrs = f'data-category="{_e(cat)}"'
    try:
        fpr, tpr = roc_curve(scores, labels)
    except ValueError as exc:
        return _undefined_chart("roc", "ROC curve", attrs, _e(exc)), math.nan
    area = trapezoid_auroc(fpr, tpr)
    attrs += f' data-auroc="{area!r}"'
    chance = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    return _unit_chart("roc", "ROC curve", attrs, fpr, tpr, f"AUROC {100 * area:.2f} %", "false positive rate",
                       "true positive rate", chance), area


def _pr_svg(cat: str, scores: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    attrs = f'data-category="{_e(cat)}"'
    try:
        recall, precision = pr_curve(scores, labels)
    except ValueError as exc:
        return _undefined_chart("pr", "Precision-recall curve", attrs, _e(exc)), math.nan
    ap = step_ap(recall, precision)
    attrs += f' data-ap="{ap!r}"'
    x, y = _pr_polyline(recall, precision)
    prevalence = float(np.mean(labels))
    chance = (np.array([0.0, 1.0]), np.array([prevalence, prevalence]))
    return _unit_chart("pr", "Precision-recall curve", attrs, x, y, f"AP {100 * ap:.2f} %", "recall", "precision",
                       chance), ap


def _hist_svg(cat: str, scores: np.ndarray, labels: np.ndarray) -> str:
    good, bad = scores[labels == 0], scores[labels == 1]
    edges, gc, bc = histogram(good, bad)
    attrs = (f'data-category="{_e(cat)}" data-edges="{" ".join(_num(v) for v in edges)}" '
             f'data-good="{" ".join(str(int(v)) for v in gc)}" data-defective="{" ".join(str(int(v)) for v in bc)}"')
    legend = [(GOOD_COLOUR, "good", f"good ({good.size})"), (BAD_COLOUR, "defective", f"defective ({bad.size})")]
    out = _frame("Image scores", legend, "image score", "images", "hist", attrs)
    xlo, xhi = float(edges[0]), float(edges[-1])
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
    return "\n".join(out + ["</svg>"])


# --------------------------------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------------------------------


def pick_gallery(rows: list[ScoreRow], n: int) -> list[ScoreRow]:
    """The worst misses of one category: defective images with the lowest scores, good ones with the highest.

    At most `n` in total, split evenly (the defective half rounded up); a kind with too few images leaves its places
    to the other. Ties are broken by image path, so the choice is deterministic.
    """
    by_path = sorted(rows, key=lambda r: r.image)
    bad = sorted((r for r in by_path if r.label == 1), key=lambda r: r.score)
    good = sorted((r for r in by_path if r.label == 0), key=lambda r: -r.score)
    n_bad = min(len(bad), (n + 1) // 2)
    n_good = min(len(good), n - n_bad)
    n_bad = min(len(bad), n - n_good)
    return bad[:n_bad] + good[:n_good]


def _png_uri(pic: Image.Image) -> str:
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail(image: Image.Image) -> Image.Image:
    """A copy of `image` shrunk (never enlarged, aspect ratio kept) to at most THUMBNAIL pixels on its long side."""
    small = image.copy()
    small.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    return small


class _Overlays:
    """The deployed model of the checkpoint, or why there is none (`note`)."""

    def __init__(self, checkpoint: str | None, device: str) -> None:
        self.predictor = None
        self.note = ""
        if not checkpoint:
            self.note = "no checkpoint is recorded in results.json and none was given"
            return
        if not Path(checkpoint).exists():
            self.note = f"checkpoint {checkpoint} does not exist (any more)"
            return
        from .predict import Predictor  # torch is needed only here

        try:
            self.predictor = Predictor.load(checkpoint, device=device)
        except OnenipError as exc:
            self.note = f"checkpoint {checkpoint} cannot be used: {exc}"

    def render(self, images: list[Image.Image]) -> list[tuple[Image.Image, Any]]:
        """(thumbnail of the overlay, Prediction) per image; thumbnails of the plain images without a model."""
        if self.predictor is None:
            return [(_thumbnail(im), None) for im in images]
        from .predict import overlay

        out = []
        for im, pred in zip(images, self.predictor.predict(images)):
            small = _thumbnail(im)
            amap = pred.anomaly_map
            if small.size != im.size:  # shrink first, so the 1-pixel mask outline stays visible
                amap = np.asarray(Image.fromarray(amap).resize(small.size, Image.Resampling.BILINEAR))
            mask = np.asarray(Image.fromarray(pred.mask).resize(small.size, Image.Resampling.NEAREST), dtype=bool)
            out.append((Image.fromarray(overlay(small, amap, pred.threshold, mask)), pred))
        return out


def _figure(row: ScoreRow, uri: str | None, pred: Any, error: str, rank: str) -> str:
    """One gallery entry: the picture (or why it is missing) and its caption."""
    kind = "defective" if row.label == 1 else "good"
    name = Path(row.image).name or row.image
    lines = [f'<span class="badge {kind}">{kind}{": " + _e(row.defect) if row.label == 1 and row.defect else ""}</span>',
             f'<span class="file" title="{_e(row.image)}">{_e(name)}</span>',
             f"test score <b>{row.score:.4g}</b> ({rank})"]
    if pred is not None:
        decision = "anomalous" if pred.anomalous else "normal"
        miss = (row.label == 1) != pred.anomalous
        verdict = ("missed" if row.label == 1 else "false alarm") if miss else "correct"
        lines.append(f'deployed: score {pred.score:.4g}, normalised <b>{pred.normalized:.3f}</b>, '
                     f'<span class="decision {decision}">{decision}</span> '
                     f'<span class="verdict {verdict.replace(" ", "-")}">({verdict})</span>')
        lines.append(f"retrieved {_e(pred.category)} (similarity {pred.similarity:.3f})")
    else:
        lines.append(f"normalised {EM_DASH}, decision {EM_DASH} (no model)")
        if row.retrieved:
            sim = f" (similarity {row.similarity:.3f})" if row.similarity is not None else ""
            lines.append(f"retrieved {_e(row.retrieved)}{sim}")
    cls = "overlay" if pred is not None else "plain"
    if uri is not None:
        pic = f'<img class="{cls}" src="{uri}" alt="{_e(name)}">'
    else:
        pic = f'<div class="missing">image unavailable: {_e(error)}</div>'
    return f'<figure class="shot {kind}">{pic}<figcaption>{"<br>".join(lines)}</figcaption></figure>'



def _gallery_html(cat: str, rows: list[ScoreRow], n: int, overlays: _Overlays) -> str:
    picks = pick_gallery(rows, n)
    if not picks:
        return ""
    ranked_bad = sorted((r.score for r in rows if r.label == 1))
    ranked_good = sorted((r.score for r in rows if r.label == 0), reverse=True)
    loaded: list[Image.Image] = []
    where: list[int | None] = []
    errors: list[str] = []
    from .images import load_image

    for r in picks:
        try:
            loaded.append(load_image(r.image))
            where.append(len(loaded) - 1)
            errors.append("")
        except DatasetError as exc:
            where.append(None)
            errors.append(str(exc))
    rendered = overlays.render(loaded) if loaded else []
    figures = []
    for r, w, err in zip(picks, where, errors):
        if r.label == 1:
            rank = f"{ranked_bad.index(r.score) + 1}. lowest of {len(ranked_bad)} defective"
        else:
            rank = f"{ranked_good.index(r.score) + 1}. highest of {len(ranked_good)} good"
        pic, pred = rendered[w] if w is not None else (None, None)
        figures.append(_figure(r, _png_uri(pic) if pic is not None else None, pred, err, rank))
    if overlays.predictor is not None:
        note = ('<p class="note">Overlays: the deployed model\'s fused anomaly map (the threshold in the middle of the '
                'colour ramp, blue low, red high) with the predicted defect outlined in white.</p>')
    else:
        note = f'<p class="note no-overlay">No overlays: {_e(overlays.note)}. The plain images are shown.</p>'
    return (f'<div class="gallery" data-category="{_e(cat)}"><h3>Worst misses</h3>{note}'
            f'<div class="shots">{"".join(figures)}</div></div>')


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:24px;margin:8px 0 12px}h2{font-size:19px;margin:0 0 8px}h3{font-size:15px;margin:14px 0 6px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 18px;margin:14px 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0;font-size:14px}
dl.facts dt{color:#5a6475}dl.facts dd{margin:0;word-break:break-all}
table.metrics{border-collapse:collapse;font-size:14px;width:100%}
table.metrics th,table.metrics td{padding:5px 9px;border-bottom:1px solid #e3e6eb;text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
table.metrics thead th{background:#1b3a6b;color:#fff}
table.metrics tbody tr:nth-child(even){background:#f3f6fa}
table.metrics tfoot td{font-weight:700;border-top:2px solid #1b3a6b;background:#e6edf7}
.charts{display:flex;flex-wrap:wrap;gap:10px}
svg.chart{background:#fafbfc;border:1px solid #e3e6eb;border-radius:6px;font-size:11px}
svg .chart-title{font-weight:700;font-size:12px}svg .grid{stroke:#eceef2}svg .tick{stroke:#666}
svg .tick-label,svg .axis-label{fill:#444}svg .undefined{fill:#a33}
.shots{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
figure.shot{margin:0;border:1px solid #dde1e7;border-radius:6px;padding:6px;background:#fafbfc;font-size:12px}
figure.shot img{display:block;max-width:100%;height:auto;margin:0 auto 4px;image-rendering:auto}
figure.shot .file{font-family:monospace;word-break:break-all}
.badge{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-weight:600}
.badge.good{background:#2b7bba}.badge.defective{background:#d7301f}
.decision.anomalous{color:#b3261e;font-weight:600}.decision.normal{color:#1f6f3a;font-weight:600}
.verdict.missed,.verdict.false-alarm{color:#b3261e}
.missing{height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#a33;padding:6px}
.note{font-size:13px;color:#5a6475}.no-overlay{color:#8a5a00}.warning{color:#b3261e;font-weight:600}
footer{font-size:12px;color:#7a8394;margin-top:20px}
"""


def _pct(v: Any, decimals: int = 1) -> str:
    """A fraction as a percentage; em dash for NaN or missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return EM_DASH
    return f"{100 * float(v):.{decimals}f}"


def _table(data: dict[str, Any], map_name: str) -> str:
    cats = data["categories"]
    head = "".join(f"<th>{n}</th>" for n in ("category", "images", "defective", *METRIC_NAMES))
    body = []
    for cat, entry in cats.items():
        res = entry.get(map_name) or {}
        cells = "".join(f"<td>{_pct(res.get(m, math.nan))}</td>" for m in METRIC_KEYS)
        body.append(f'<tr data-category="{_e(cat)}"><td>{_e(cat)}</td><td>{_e(entry.get("images", EM_DASH))}</td>'
                    f'<td>{_e(entry.get("defective", EM_DASH))}</td>{cells}</tr>')
    mean = (data.get("mean") or {}).get(map_name)
    if not isinstance(mean, dict):  # older or hand-made files: the unweighted mean over categories, as evaluate does
        mean = {}
        for m in METRIC_KEYS:
            vals = [float(e[map_name][m]) for e in cats.values() if map_name in e and not math.isnan(float(e[map_name][m]))]
            mean[m] = float(np.mean(vals)) if vals else math.nan
    n_img = sum(int(e.get("images", 0) or 0) for e in cats.values())
    n_bad = sum(int(e.get("defective", 0) or 0) for e in cats.values())
    foot = "".join(f"<td>{_pct(mean.get(m, math.nan))}</td>" for m in METRIC_KEYS)
    rows = f'<tr class="mean"><td>mean</td><td>{n_img}</td><td>{n_bad}</td>{foot}</tr>'
    pooled = (data.get("pooled") or {}).get(map_name)
    if isinstance(pooled, dict):  # all images ranked together: image metrics only
        cells = "".join(f"<td>{_pct(pooled.get(m, math.nan))}</td>" for m in METRIC_KEYS)
        rows += (f'<tr class="pooled" title="all test images ranked together, whatever their category"><td>pooled</td>'
                 f"<td>{n_img}</td><td>{n_bad}</td>{cells}</tr>")
    return (f'<table class="metrics" id="metrics" data-map="{_e(map_name)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody><tfoot>{rows}</tfoot></table>')


def _decisions(data: dict[str, Any]) -> str:
    """One line: false alarms and misses at the model's own thresholds (results.json's 'decisions'), or why none."""
    d = data.get("decisions")
    if not isinstance(d, dict) or not isinstance(d.get("all"), dict):
        note = data.get("decisions_note")
        return f"{EM_DASH} ({_e(note)})" if note else EM_DASH
    a = d["all"]

    def part(k: int, n: int, what: str) -> str:
        return f"{k} of {n} {what}" + (f" ({100 * k / n:.1f} %)" if n else "")

    return (part(int(a["false_alarms"]), int(a["good"]), "good images flagged") + ", "
            + part(int(a["missed"]), int(a["defective"]), "defective images passed"))


def _header(data: dict[str, Any], rows: list[ScoreRow], map_name: str, checkpoint: str | None, src: Path) -> str:
    def opt(v: Any, fmt: str) -> str:
        return EM_DASH if v is None else format(float(v), fmt)

    ret = data.get("retrieval_accuracy")
    ret_text = f"{100 * float(ret):.2f} %" if ret is not None else f"{EM_DASH} (prompts given by the protocol)"
    n_bad = sum(r.label for r in rows)
    facts = [("results", _e(src)), ("protocol", _e(data.get("protocol", EM_DASH))),
             ("checkpoint", _e(data.get("checkpoint") or EM_DASH)),
             ("fusion constant c", opt(data.get("fusion_scale"), ".6g")),
             ("prompt retrieval accuracy", ret_text),
             ("test images", f"{len(rows)} ({len(rows) - n_bad} good, {n_bad} defective) in {len(data['categories'])} "
                             "categories"),
             ("scored map", _e(map_name)),
             ("decisions at the model's thresholds", _decisions(data))]
    if checkpoint and checkpoint != data.get("checkpoint"):
        facts.append(("gallery checkpoint", _e(checkpoint)))
    secs = data.get("seconds") or {}
    if isinstance(secs, dict) and secs.get("images_per_s") is not None:
        facts.append(("speed", f"{_e(secs.get('images_per_s'))} images/s, {_e(secs.get('total', EM_DASH))} s in all"))
    skipped = data.get("skipped") or []
    if skipped:
        items = "".join(f"<li><code>{_e(s.get('image', s) if isinstance(s, dict) else s)}</code>: "
                        f"{_e(s.get('reason', '') if isinstance(s, dict) else '')}</li>" for s in skipped)
        facts.append(("skipped files", f'<details class="skipped"><summary>{len(skipped)} unusable test files left '
                                       f"out</summary><ul>{items}</ul></details>"))
    else:
        facts.append(("skipped files", "none"))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    return f'<section id="summary"><h1>onenip test report</h1><dl class="facts">{dl}</dl></section>'


def make_report(results_dir: str | Path, output: str | Path | None = None, map_name: str = "fused", gallery: int = 8,
                checkpoint: str | Path | None = None, device: str = "auto") -> Path:
    """Write one self-contained HTML report of the test run whose results.json and scores.csv are in `results_dir`.

    Args:
        results_dir: the folder `onenip test` wrote (results.json, scores.csv).
        output: the HTML file (default results_dir/report.html); an existing folder gets report.html inside.
        map_name: which scored map the table, curves and gallery are about ('fused', 'rec' or 'ref').
        gallery: worst misses shown per category (0: no gallery).
        checkpoint: the model drawing the gallery's overlays (default: results.json's checkpoint).
        device: where that model runs ('auto', 'cpu', 'cuda', ...).

    Returns:
        The path of the written file.

    Raises:
        DatasetError: results.json or scores.csv is missing or malformed (naming it).
        OnenipError: `map_name` was not scored in this run.
    """
    if gallery < 0:
        raise ValueError(f"gallery must be >= 0, got {gallery}")
    folder = Path(results_dir)
    data, rows = read_run(folder, map_name)
    out = Path(output) if output is not None else folder / "report.html"
    if out.is_dir():
        out = out / "report.html"
    ckpt = str(checkpoint) if checkpoint is not None else data.get("checkpoint")
    overlays = _Overlays(ckpt, device) if gallery > 0 else None

    by_cat: dict[str, list[ScoreRow]] = {}
    for r in rows:
        by_cat.setdefault(r.category, []).append(r)
    sections = []
    warnings_html = []
    for i, (cat, entry) in enumerate(data["categories"].items()):
        crow = by_cat.get(cat, [])
        scores = np.array([r.score for r in crow], dtype=np.float64)
        labels = np.array([r.label for r in crow], dtype=np.int64)
        roc, area = _roc_svg(cat, scores, labels)
        pr, ap = _pr_svg(cat, scores, labels)
        hist = _hist_svg(cat, scores, labels)
        res = entry.get(map_name) or {}
        for name, got, key in (("AUROC", area, "image_auroc"), ("AP", ap, "image_ap")):
            want = float(res.get(key, math.nan))
            if not (math.isnan(got) and math.isnan(want)) and not abs(got - want) <= 1e-6:
                warnings_html.append(f"<li>{_e(cat)}: image {name} from scores.csv is {got:.6f}, results.json says "
                                     f"{want:.6f}</li>")
        n_bad = int(labels.sum())
        intro = (f'<p class="note">{len(crow)} test images ({len(crow) - n_bad} good, {n_bad} defective); '
                 f"image AUROC {_pct(res.get('image_auroc'))} %, AP {_pct(res.get('image_ap'))} %, "
                 f"F1-max {_pct(res.get('image_f1max'))} %.</p>")
        gal = _gallery_html(cat, crow, gallery, overlays) if overlays is not None else ""
        sections.append(f'<section class="category" id="category-{i}" data-category="{_e(cat)}"><h2>{_e(cat)}</h2>'
                        f'{intro}<div class="charts">{roc}{pr}{hist}</div>{gal}</section>')
    warn = (f'<section id="warnings"><p class="warning">scores.csv and results.json disagree:</p><ul>'
            f'{"".join(warnings_html)}</ul></section>') if warnings_html else ""
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    from . import __version__

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>onenip report: {_e(folder.name)}</title><style>{_CSS}</style></head><body><main>"
        f"{_header(data, rows, map_name, ckpt, folder)}{warn}"
        f'<section id="table"><h2>Metrics per category ({_e(map_name)} map, %)</h2>{_table(data, map_name)}'
        '<p class="note">Image metrics from the image scores, pixel metrics from the anomaly maps; '
        f"{EM_DASH} where undefined (no masks, or one class only). The mean is unweighted over categories.</p></section>"
        f'{"".join(sections)}'
        f"<footer>Written by onenip {__version__} on {now}.</footer></main></body></html>\n"
    )
    atomic_write_text(out, page)
    return out
