"""`onenip report RUN_DIR`: one self-contained HTML page from the results of a test run.

The page is built from the two files `onenip test` writes (see `onenip.evaluation.evaluate.write_results`): results.json (metrics) and
scores.csv (one image score per test image). It holds

* a header: protocol, checkpoint, fusion constant, prompt retrieval accuracy, number of images, skipped files;
* the false alarms and misses at the model's own thresholds (results.json's `decisions`, when the run has them);
* the per-category table of the seven metrics of one scored map (in %, NaN as an em dash), their mean and the
  pooled image metrics (all test images ranked together);
* per category: the ROC curve and the precision-recall curve of the image scores, computed exactly from scores.csv
  (`onenip.report.charts`: sort and cumulative counts at every distinct score, as `onenip.evaluation.metrics` does:
  the AUROC is the trapezoid area of the ROC polyline, the AP the step-wise area of the PR curve, so both equal
  results.json's image_auroc and image_ap), and the distribution of the scores of good and defective images (two
  histograms on a shared binning, with the category's decision threshold marked when the run has one and the page is
  about the fused map, the one the thresholds apply to);
* per category, a gallery. When the run has decisions (scores.csv rows carry `anomalous`, clean protocol): the misses
  (defective images judged good) and the false alarms (good images judged defective) at the model's thresholds, worst
  first, or a line saying there are none. Without decisions (paper protocol): the hardest images, i.e. the defective
  images with the lowest scores and the good ones with the highest, titled as such (no thresholds say which are
  misses). Each picture is the deployed model's overlay (anomaly heat map, defect mask outlined) with its score,
  normalised score, decision and retrieved category. Without a usable checkpoint the plain images are shown, with a
  note saying why.

Everything is inline (CSS, SVG charts, images as base64 PNG data URIs): the file can be mailed or archived on its own
and opens without network access. Every string read from a file is HTML-escaped.

    from onenip.report.page import make_report
    make_report("runs/x/results/clean")          # -> runs/x/results/clean/report.html
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onenip.checkpoint import atomic_write_text, file_sha256
from onenip.errors import DatasetError, OnenipError, OnenipWarning
from onenip.report import charts
from onenip.report.html_file import escape, page_file, png_uri, thumbnail
from onenip.report.predictions import make_predictions_report

__all__ = ["ScoreRow", "has_decisions", "make_report", "pick_gallery", "read_run"]

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
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
    # the test's decision (clean protocol, `decision_summary`): threshold of the retrieved category, normalised fused
    # score, and whether it exceeded the threshold; None where the run has no decisions
    threshold: float | None = None
    normalized: float | None = None
    anomalous: bool | None = None

    @property
    def wrong(self) -> bool:
        """A miss or a false alarm at the test's threshold (False without a decision)."""
        return self.anomalous is not None and self.anomalous != (self.label == 1)


_ANOMALOUS = {"": None, "true": True, "false": False, "1": True, "0": False}


def _parse_float(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    return float(text)


def _nan_for_null(data: dict[str, Any]) -> None:
    """Undefined metrics back to NaN, in place: results.json writes them as null (strict JSON)."""
    def metrics(d: Any) -> Any:
        return {k: math.nan if v is None else v for k, v in d.items()} if isinstance(d, dict) else d

    for entry in data["categories"].values():
        for m in ("rec", "ref", "fused"):
            if isinstance(entry.get(m), dict):
                entry[m] = metrics(entry[m])
    for key in ("mean", "pooled"):
        if isinstance(data.get(key), dict):
            data[key] = {m: metrics(v) for m, v in data[key].items()}


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
    _nan_for_null(data)
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
                try:
                    anomalous = _ANOMALOUS[str(rec.get("anomalous") or "").strip().lower()]
                    threshold, normalized = _parse_float(rec.get("threshold")), _parse_float(rec.get("normalized"))
                except (KeyError, ValueError, TypeError, AttributeError):
                    raise DatasetError(f"{spath} line {line} is malformed: anomalous {rec.get('anomalous')!r}, threshold "
                                       f"{rec.get('threshold')!r}, normalized {rec.get('normalized')!r}") from None
                rows.append(ScoreRow(image=rec["image"] or "", category=rec["category"] or "", defect=rec.get("defect") or "",
                                     label=label, retrieved=rec.get("retrieved") or "", similarity=sim, score=score,
                                     threshold=threshold, normalized=normalized, anomalous=anomalous))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{spath} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise DatasetError(f"{spath} is not valid CSV: {exc}") from None
    return data, rows


# --------------------------------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------------------------------


def has_decisions(rows: list[ScoreRow]) -> bool:
    """Whether every row carries the test's decision (clean protocol with thresholds); False for no rows."""
    return bool(rows) and all(r.anomalous is not None for r in rows)


def _badness(r: ScoreRow) -> float:
    """How far an image lies above its threshold: the normalised score where the row has one (the fused score
    relative to the threshold that decided it), else the score."""
    return r.normalized if r.normalized is not None and math.isfinite(r.normalized) else r.score


def _candidates(rows: list[ScoreRow], decisions: bool) -> tuple[list[ScoreRow], list[ScoreRow]]:
    """The defective and the good candidates of a gallery, worst first, ties by image path (see `pick_gallery`)."""
    by_path = sorted(rows, key=lambda r: r.image)
    if decisions:
        bad = sorted((r for r in by_path if r.label == 1 and r.anomalous is False), key=_badness)
        good = sorted((r for r in by_path if r.label == 0 and r.anomalous is True), key=lambda r: -_badness(r))
    else:
        bad = sorted((r for r in by_path if r.label == 1), key=lambda r: r.score)
        good = sorted((r for r in by_path if r.label == 0), key=lambda r: -r.score)
    return bad, good


def pick_gallery(rows: list[ScoreRow], n: int, decisions: bool | None = None) -> list[ScoreRow]:
    """The gallery of one category: at most `n` images, defective ones first.

    With decisions (`decisions` True, or None and every row carries one, see `has_decisions`): the misses (defective
    images judged good), lowest score first, then the false alarms (good images judged defective), highest score
    first; the score is the normalised one where rows have it (same order as the score within one threshold). Images
    judged correctly are never picked, so the list is empty when the category has no error.
    Without decisions: the hardest images, the defective ones with the lowest scores and the good ones with the highest.

    The places are split evenly (the defective half rounded up); a kind with too few images leaves its places to the
    other. Ties are broken by image path, so the choice is deterministic.
    """
    bad, good = _candidates(rows, has_decisions(rows) if decisions is None else decisions)
    n = max(n, 0)
    n_bad = min(len(bad), (n + 1) // 2)
    n_good = min(len(good), n - n_bad)
    n_bad = min(len(bad), n - n_good)
    return bad[:n_bad] + good[:n_good]


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
        from onenip.deploy.predictor import Predictor  # torch is needed only here

        try:
            self.predictor = Predictor.load(checkpoint, device=device)
        except OnenipError as exc:
            self.note = f"checkpoint {checkpoint} cannot be used: {exc}"

    def render(self, images: list[Image.Image]) -> list[tuple[Image.Image, Any]]:
        """(thumbnail of the overlay, Prediction) per image; thumbnails of the plain images without a model."""
        if self.predictor is None:
            return [(thumbnail(im), None) for im in images]
        from onenip.deploy.predictor import overlay

        out = []
        for im, pred in zip(images, self.predictor.predict(images)):
            small = thumbnail(im)
            amap = pred.anomaly_map
            if small.size != im.size:  # shrink first, so the 1-pixel mask outline stays visible
                amap = np.asarray(Image.fromarray(amap).resize(small.size, Image.Resampling.BILINEAR))
            mask = np.asarray(Image.fromarray(pred.mask).resize(small.size, Image.Resampling.NEAREST), dtype=bool)
            out.append((Image.fromarray(overlay(small, amap, pred.threshold, mask)), pred))
        return out


def _verdict(label: int, anomalous: bool) -> tuple[str, str]:
    """(decision, verdict) of one image: 'anomalous' or 'normal', and 'correct', 'missed' or 'false alarm'."""
    decision = "anomalous" if anomalous else "normal"
    if (label == 1) == anomalous:
        return decision, "correct"
    return decision, "missed" if label == 1 else "false alarm"


def _decision_html(decision: str, verdict: str) -> str:
    return (f'<span class="decision {decision}">{decision}</span> '
            f'<span class="verdict {verdict.replace(" ", "-")}">({verdict})</span>')


def _figure(row: ScoreRow, uri: str | None, pred: Any, error: str, rank: str) -> str:
    """One gallery entry: the picture (or why it is missing) and its caption."""
    kind = "defective" if row.label == 1 else "good"
    name = Path(row.image).name or row.image
    lines = [f'<span class="badge {kind}">{kind}{": " + escape(row.defect) if row.label == 1 and row.defect else ""}</span>',
             f'<span class="file" title="{escape(row.image)}">{escape(name)}</span>',
             f"test score <b>{row.score:.4g}</b> ({rank})"]
    if row.anomalous is not None:  # the decision recorded by the test (scores.csv)
        norm = f"{row.normalized:.3f}" if row.normalized is not None else EM_DASH
        thr = f", threshold {row.threshold:.4g}" if row.threshold is not None else ""
        of = f" of {escape(row.retrieved)}" if thr and row.retrieved else ""
        lines.append(f'<span class="tested">at the test: normalised <b>{norm}</b>, '
                     f"{_decision_html(*_verdict(row.label, row.anomalous))}{thr}{of}</span>")
    if pred is not None:
        lines.append(f'deployed: score {pred.score:.4g}, normalised <b>{pred.normalized:.3f}</b>, '
                     f"{_decision_html(*_verdict(row.label, bool(pred.anomalous)))}")
        lines.append(f"retrieved {escape(pred.category)} (similarity {pred.similarity:.3f})")
    else:
        if row.anomalous is not None:
            lines.append(f"deployed: {EM_DASH} (no model)")
        else:
            lines.append(f"normalised {EM_DASH}, decision {EM_DASH} (no model)")
        if row.retrieved:
            sim = f" (similarity {row.similarity:.3f})" if row.similarity is not None else ""
            lines.append(f"retrieved {escape(row.retrieved)}{sim}")
    cls = "overlay" if pred is not None else "plain"
    if uri is not None:
        pic = f'<img class="{cls}" src="{uri}" alt="{escape(name)}">'
    else:
        pic = f'<div class="missing">image unavailable: {escape(error)}</div>'
    return f'<figure class="shot {kind}">{pic}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


def _gallery_html(cat: str, rows: list[ScoreRow], n: int, overlays: _Overlays, decisions: bool) -> str:
    """The gallery of one category (see `pick_gallery`); with decisions, a line saying so when there is no error."""
    picks = pick_gallery(rows, n, decisions)
    if decisions:
        misses, alarms = _candidates(rows, True)
        head = "Misses and false alarms at the model's threshold"
        attrs = f'data-category="{escape(cat)}" data-kind="errors" data-misses="{len(misses)}" data-false-alarms="{len(alarms)}"'
        if not picks:
            return (f'<div class="gallery" {attrs}><h3>{head}</h3><p class="note no-errors">{escape(cat)}: no misses or '
                    "false alarms at the model's threshold (every test image was judged correctly).</p></div>")
        shown = sum(r.label == 1 for r in picks), sum(r.label == 0 for r in picks)
        what = (f"{shown[0]} of {len(misses)} misses (defective images judged good, lowest score first) and {shown[1]} "
                f"of {len(alarms)} false alarms (good images judged defective, highest score first) at the model's "
                "threshold.")
    else:
        if not picks:
            return ""
        head = "Hardest images (no thresholds in this run)"
        attrs = f'data-category="{escape(cat)}" data-kind="hardest"'
        what = ("The defective images with the lowest scores and the good images with the highest. This run has no "
                "decision thresholds, so it does not say which of them are misses.")
    ranked_bad = sorted((r.score for r in rows if r.label == 1))
    ranked_good = sorted((r.score for r in rows if r.label == 0), reverse=True)
    loaded: list[Image.Image] = []
    where: list[int | None] = []
    errors: list[str] = []
    from onenip.data.images import load_image

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
        if decisions and r.label == 1:
            rank = f"{next(i for i, m in enumerate(misses) if m is r) + 1}. worst of {len(misses)} missed"
        elif decisions:
            rank = f"{next(i for i, m in enumerate(alarms) if m is r) + 1}. worst of {len(alarms)} false alarms"
        elif r.label == 1:
            rank = f"{ranked_bad.index(r.score) + 1}. lowest of {len(ranked_bad)} defective"
        else:
            rank = f"{ranked_good.index(r.score) + 1}. highest of {len(ranked_good)} good"
        pic, pred = rendered[w] if w is not None else (None, None)
        figures.append(_figure(r, png_uri(pic) if pic is not None else None, pred, err, rank))
    if overlays.predictor is not None:
        note = ('<p class="note">Overlays: the deployed model\'s fused anomaly map (the threshold in the middle of the '
                'colour ramp, blue low, red high) with the predicted defect outlined in white.</p>')
    else:
        note = f'<p class="note no-overlay">No overlays: {escape(overlays.note)}. The plain images are shown.</p>'
    return (f'<div class="gallery" {attrs}><h3>{head}</h3><p class="note what">{what}</p>{note}'
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
.verdict.missed,.verdict.false-alarm{color:#b3261e}.no-errors{color:#1f6f3a}
svg .threshold-label{font-size:10px}
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
        body.append(f'<tr data-category="{escape(cat)}"><td>{escape(cat)}</td><td>{escape(entry.get("images", EM_DASH))}</td>'
                    f'<td>{escape(entry.get("defective", EM_DASH))}</td>{cells}</tr>')
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
    return (f'<table class="metrics" id="metrics" data-map="{escape(map_name)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody><tfoot>{rows}</tfoot></table>')


def _decisions(data: dict[str, Any]) -> str:
    """One line: false alarms and misses at the model's own thresholds (results.json's 'decisions'), or why none."""
    d = data.get("decisions")
    if not isinstance(d, dict) or not isinstance(d.get("all"), dict):
        note = data.get("decisions_note")
        return f"{EM_DASH} ({escape(note)})" if note else EM_DASH
    a = d["all"]

    def part(k: int, n: int, what: str) -> str:
        return f"{k} of {n} {what}" + (f" ({100 * k / n:.1f} %)" if n else "")

    return (part(int(a["false_alarms"]), int(a["good"]), "good images flagged") + ", "
            + part(int(a["missed"]), int(a["defective"]), "defective images passed"))


def _thresholds(data: dict[str, Any]) -> dict[str, float]:
    """The model's threshold per category (results.json's decisions.thresholds): finite numbers only, {} if none."""
    d = data.get("decisions")
    raw = d.get("thresholds") if isinstance(d, dict) else None
    out: dict[str, float] = {}
    for cat, t in (raw.items() if isinstance(raw, dict) else ()):
        try:
            value = float(t)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out[str(cat)] = value
    return out


def _category_decisions(data: dict[str, Any], cat: str, thresholds: dict[str, float], map_name: str) -> str:
    """' Threshold t: k of n good images flagged, j of m defective passed.' for one category, or ''."""
    if cat not in thresholds:
        return ""
    line = f" Threshold {thresholds[cat]:.4g} (fused score"
    line += ", marked on the histogram)" if map_name == "fused" else f"; the histogram shows the {escape(map_name)} map)"
    d = data.get("decisions")
    c = (d.get("categories") or {}).get(cat) if isinstance(d, dict) and isinstance(d.get("categories"), dict) else None
    if isinstance(c, dict):
        try:
            line += (f": {int(c['false_alarms'])} of {int(c['good'])} good images flagged, {int(c['missed'])} of "
                     f"{int(c['defective'])} defective passed")
        except (KeyError, TypeError, ValueError):
            pass
    return line + "."


def _header(data: dict[str, Any], rows: list[ScoreRow], map_name: str, checkpoint: str | None, src: Path) -> str:
    def opt(v: Any, fmt: str) -> str:
        return EM_DASH if v is None else format(float(v), fmt)

    ret = data.get("retrieval_accuracy")
    ret_text = f"{100 * float(ret):.2f} %" if ret is not None else f"{EM_DASH} (prompts given by the protocol)"
    n_bad = sum(r.label for r in rows)
    facts = [("results", escape(src)), ("protocol", escape(data.get("protocol", EM_DASH))),
             ("checkpoint", escape(data.get("checkpoint") or EM_DASH)),
             ("fusion constant c", opt(data.get("fusion_scale"), ".6g")),
             ("prompt retrieval accuracy", ret_text),
             ("test images", f"{len(rows)} ({len(rows) - n_bad} good, {n_bad} defective) in {len(data['categories'])} "
                             "categories"),
             ("scored map", escape(map_name)),
             ("decisions at the model's thresholds", _decisions(data))]
    if checkpoint and checkpoint != data.get("checkpoint"):
        facts.append(("gallery checkpoint", escape(checkpoint)))
    secs = data.get("seconds") or {}
    if isinstance(secs, dict) and secs.get("images_per_s") is not None:
        facts.append(("speed", f"{escape(secs.get('images_per_s'))} images/s, {escape(secs.get('total', EM_DASH))} s in all"))
    skipped = data.get("skipped") or []
    if skipped:
        items = "".join(f"<li><code>{escape(s.get('image', s) if isinstance(s, dict) else s)}</code>: "
                        f"{escape(s.get('reason', '') if isinstance(s, dict) else '')}</li>" for s in skipped)
        facts.append(("skipped files", f'<details class="skipped"><summary>{len(skipped)} unusable test files left '
                                       f"out</summary><ul>{items}</ul></details>"))
    else:
        facts.append(("skipped files", "none"))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    return f'<section id="summary"><h1>onenip test report</h1><dl class="facts">{dl}</dl></section>'


def make_report(results_dir: str | Path, output: str | Path | None = None, map_name: str = "fused", gallery: int = 8,
                checkpoint: str | Path | None = None, device: str = "auto") -> Path:
    """Write one self-contained HTML report of the test run whose results.json and scores.csv are in `results_dir`
    (or, for the output folder of `onenip predict`, the page of `onenip.report.predictions`).

    Args:
        results_dir: the folder `onenip test` wrote (results.json, scores.csv).
        output: the HTML file (default results_dir/report.html); an existing folder gets report.html inside.
        map_name: which scored map the table, curves and gallery are about ('fused', 'rec' or 'ref').
        gallery: images shown per category (0: no gallery): the misses and false alarms at the model's thresholds
            when the run has decisions, else the hardest images.
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
    if (folder / "predictions.json").is_file() and not (folder / "results.json").is_file():
        return make_predictions_report(folder, output, gallery)  # an `onenip predict` folder: its own page
    data, rows = read_run(folder, map_name)
    out = page_file(folder, output)  # never over a model or a training checkpoint
    ckpt = str(checkpoint) if checkpoint is not None else data.get("checkpoint")
    overlays = _Overlays(ckpt, device) if gallery > 0 else None
    changed = ""  # the gallery's model is results.json's, but its file was rewritten since the test
    if overlays is not None and overlays.predictor is not None and ckpt == data.get("checkpoint") \
            and data.get("checkpoint_sha256") and file_sha256(ckpt) != data["checkpoint_sha256"]:
        warnings.warn(f"{ckpt} has changed since this test: the gallery's deployed scores and decisions are the "
                      "current file's", OnenipWarning, stacklevel=2)
        changed = (f'<p class="warning">{escape(ckpt)} has changed since this test (trained on, or calibrated): the '
                   "gallery's deployed scores and decisions are the current file's, not the tested model's.</p>")

    thresholds = _thresholds(data)
    decided = has_decisions(rows)  # the gallery shows misses and false alarms, not merely the hardest images
    by_cat: dict[str, list[ScoreRow]] = {}
    for r in rows:
        by_cat.setdefault(r.category, []).append(r)
    sections = []
    warnings_html = []
    for i, (cat, entry) in enumerate(data["categories"].items()):
        crow = by_cat.get(cat, [])
        scores = np.array([r.score for r in crow], dtype=np.float64)
        labels = np.array([r.label for r in crow], dtype=np.int64)
        roc, area = charts.roc_svg(cat, scores, labels)
        pr, ap = charts.pr_svg(cat, scores, labels)
        hist = charts.histogram_svg(cat, scores, labels, thresholds.get(cat) if map_name == "fused" else None)
        res = entry.get(map_name) or {}
        for name, got, key in (("AUROC", area, "image_auroc"), ("AP", ap, "image_ap")):
            want = float(res.get(key, math.nan))
            if not (math.isnan(got) and math.isnan(want)) and not abs(got - want) <= 1e-6:
                warnings_html.append(f"<li>{escape(cat)}: image {name} from scores.csv is {got:.6f}, results.json says "
                                     f"{want:.6f}</li>")
        n_bad = int(labels.sum())
        intro = (f'<p class="note">{len(crow)} test images ({len(crow) - n_bad} good, {n_bad} defective); '
                 f"image AUROC {_pct(res.get('image_auroc'))} %, AP {_pct(res.get('image_ap'))} %, "
                 f"F1-max {_pct(res.get('image_f1max'))} %.{_category_decisions(data, cat, thresholds, map_name)}</p>")
        gal = _gallery_html(cat, crow, gallery, overlays, decided) if overlays is not None else ""
        sections.append(f'<section class="category" id="category-{i}" data-category="{escape(cat)}"><h2>{escape(cat)}</h2>'
                        f'{intro}<div class="charts">{roc}{pr}{hist}</div>{gal}</section>')
    warn = (f'<p class="warning">scores.csv and results.json disagree:</p><ul>{"".join(warnings_html)}</ul>'
            if warnings_html else "")
    warn = f'<section id="warnings">{changed}{warn}</section>' if changed or warn else ""
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    from onenip.version import __version__

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>onenip report: {escape(folder.name)}</title><style>{_CSS}</style></head><body><main>"
        f"{_header(data, rows, map_name, ckpt, folder)}{warn}"
        f'<section id="table"><h2>Metrics per category ({escape(map_name)} map, %)</h2>{_table(data, map_name)}'
        '<p class="note">Image metrics from the image scores, pixel metrics from the anomaly maps; '
        f"{EM_DASH} where undefined (no masks, or one class only). The mean is unweighted over categories.</p></section>"
        f'{"".join(sections)}'
        f"<footer>Written by onenip {__version__} on {now}.</footer></main></body></html>\n"
    )
    atomic_write_text(out, page)
    return out
