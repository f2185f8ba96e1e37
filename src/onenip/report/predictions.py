"""`onenip report PREDICT_FOLDER`: one self-contained HTML page of an `onenip predict` run.

A predict run has no ground truth, so the page shows what the model decided: per product type, how many images were
judged good, defective and of an unknown type; the distribution of the normalised scores (0.5 is the threshold);
and galleries of the images judged defective (highest score first) and of those of an unknown type (farthest first),
each as the overlay the run wrote (decision, score and colour legend in its caption). Everything is inline, as in the
test report: the file opens anywhere without network access, and every string read from a file is HTML-escaped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onenip.checkpoint import atomic_write_text
from onenip.errors import DatasetError
from onenip.report.html_file import escape, page_file, png_uri, thumbnail
from onenip.version import __version__


def read_predictions(folder: str | Path) -> dict[str, Any]:
    """predictions.json of a predict run, checked (DatasetError naming the file and what is wrong)."""
    path = Path(folder) / "predictions.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist: {folder} is not an output folder of `onenip predict`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    rows = data.get("predictions") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path} is malformed: no list of 'predictions' (not written by `onenip predict`?)")
    for i, r in enumerate(rows):
        missing = [k for k in ("image", "category", "normalized_score", "anomalous") if k not in r]
        if missing:
            raise DatasetError(f"{path} is malformed: prediction {i} lacks {', '.join(missing)}")
        r.setdefault("decision", "defective" if r["anomalous"] else "good")  # runs from before the unknown type
    return data


def _thumb_uri(folder: Path, rel: Any) -> str | None:
    """The overlay at `rel` (inside `folder` only) as a PNG data URI, or None when it cannot be read."""
    if not isinstance(rel, str) or not rel:
        return None
    path = (folder / rel).resolve()
    if folder.resolve() not in path.parents:  # an edited index cannot reach outside the run's folder
        return None
    try:
        with Image.open(path) as img:
            small = thumbnail(img)
    except (OSError, ValueError):
        return None
    return png_uri(small)


def _histogram(values: list[float], bins: int = 20) -> str:
    """An inline SVG histogram of normalised scores in [0, 1] with the threshold (0.5) marked."""
    counts = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0, 1))[0] if values else np.zeros(bins, int)
    w, h, top = 300, 120, max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{10 + i * (w - 20) / bins:.1f}" y="{h - 20 - 80 * c / top:.1f}" width="{(w - 20) / bins - 1:.1f}" '
        f'height="{80 * c / top:.1f}" fill="{"#c0392b" if i >= bins // 2 else "#2e8b57"}"/>' for i, c in enumerate(counts))
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="normalised scores">{bars}'
            f'<line x1="{w / 2}" y1="10" x2="{w / 2}" y2="{h - 20}" stroke="#000" stroke-dasharray="4 3"/>'
            f'<text x="{w / 2 + 4}" y="20" font-size="11">threshold</text>'
            f'<text x="10" y="{h - 5}" font-size="11">0</text><text x="{w - 18}" y="{h - 5}" font-size="11">1</text></svg>')


def _gallery(folder: Path, rows: list[dict[str, Any]], title: str, n: int) -> str:
    if not rows:
        return ""
    figs = []
    for r in rows[:n]:
        uri = _thumb_uri(folder, r.get("overlay"))
        pic = f'<img src="{uri}" alt="overlay">' if uri else '<p class="note">(no overlay: run without --no-images)</p>'
        figs.append(f"<figure>{pic}<figcaption>{escape(Path(str(r['image'])).name)}<br>{escape(r['decision'])}, "
                    f"normalised {float(r['normalized_score']):.3f}</figcaption></figure>")
    more = f" (the first {n} of {len(rows)})" if len(rows) > n else ""
    return f"<h3>{escape(title)}{more}</h3><div class=\"gallery\">{''.join(figs)}</div>"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
        ".gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:260px}figcaption{font-size:12px}"
        ".note{color:#666}")


def make_predictions_report(folder: str | Path, output: str | Path | None = None, gallery: int = 8) -> Path:
    """Write the page of the predict run in `folder` to `output` (default folder/report.html) and return its path."""
    src = Path(folder)
    data = read_predictions(src)
    rows, summary = data["predictions"], data.get("summary", {})
    out = page_file(src, output)
    cats = sorted({str(r["category"]) for r in rows})
    table = ["<table><tr><th>product type</th><th>images</th><th>good</th><th>defective</th><th>unknown type</th></tr>"]
    sections = []
    for cat in cats:
        mine = [r for r in rows if str(r["category"]) == cat]
        count = {d: sum(r["decision"] == d for r in mine) for d in ("good", "defective", "unknown")}
        table.append(f"<tr><td>{escape(cat)}</td><td>{len(mine)}</td><td>{count['good']}</td><td>{count['defective']}</td>"
                     f"<td>{count['unknown']}</td></tr>")
        flagged = sorted((r for r in mine if r["decision"] == "defective"), key=lambda r: -float(r["normalized_score"]))
        unknown = sorted((r for r in mine if r["decision"] == "unknown"), key=lambda r: -float(r.get("type_distance") or 0))
        judged = [float(r["normalized_score"]) for r in mine if r["decision"] != "unknown"]
        sections.append(f"<section><h2>{escape(cat)}</h2><p class=\"note\">normalised scores of the judged images "
                        f"(above 0.5: defective)</p>{_histogram(judged)}"
                        + (_gallery(src, flagged, "judged defective", gallery) if gallery else "")
                        + (_gallery(src, unknown, f"unknown type (the nearest known type is {cat})", gallery)
                           if gallery else "") + "</section>")
    table.append("</table>")
    skipped = summary.get("skipped") or []
    facts = (f"<p>{len(rows)} images judged by {escape(summary.get('checkpoint', 'the model'))}"
             + (f"; {len(skipped)} unreadable images left out" if skipped else "")
             + (f"; every image taken as {escape(summary['given_type'])}" if summary.get("given_type") else "")
             + (f"; threshold level {escape(summary['level'])}" if summary.get("level") is not None else "")
             + (f"; thresholds at false alarm rate {escape(summary['far'])}" if summary.get("far") is not None else "")
             + ".</p>")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>onenip predictions: {escape(src.name)}</title>"
            f"<style>{_CSS}</style></head><body><main><h1>Predictions: {escape(src)}</h1>{facts}{''.join(table)}"
            f"{''.join(sections)}<p class=\"note\">onenip {escape(__version__)}</p></main></body></html>")
    atomic_write_text(out, page)
    return out
