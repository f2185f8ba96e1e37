"""`onenip report`: the self-contained HTML page of a test run (table, curves, score histograms, gallery)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip import cli
from onenip.api import make_config
from onenip.api import test as run_test
from onenip.checkpoint import file_sha256
from onenip.data.images import load_image
from onenip.errors import ConfigError, DatasetError, OnenipError, OnenipWarning
from onenip.evaluation.evaluate import METRICS, decision_summary
from onenip.evaluation.metrics import auroc, average_precision, image_metrics
from onenip.report.charts import histogram, histogram_svg, pr_curve, roc_curve, step_ap, trapezoid_auroc
from onenip.report.html_file import THUMBNAIL
from onenip.report.page import ScoreRow, make_report, pick_gallery
from onenip.training.trainer import Trainer

TWO = "[disc, weave]"  # two generated categories
PNG_URI = "data:image/png;base64,"


def small(*extra: str) -> list[str]:
    return ["data.input_size=64", "data.workers=0", "backbone.name=tf_efficientnet_lite0",
            "backbone.weights=efficientnet-lite", "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4",
            "model.refiner_channels=32", "train.device=cpu", "eval.batch_size=16", *extra]


# -- a tiny DOM from the standard library's parser --------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: "Node | None") -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.content: list[Node | str] = []  # text and child elements in document order

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.content)

    def all(self, tag: str, cls: str | None = None) -> list["Node"]:
        out = []
        for c in self.children:
            if c.tag == tag and (cls is None or cls in (c.attrs.get("class") or "").split()):
                out.append(c)
            out += c.all(tag, cls)
        return out

    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()


class Tree(HTMLParser):
    """Every element with its attributes and text; also records every tag seen (to look for <script>)."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root
        self.tags: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        self.cur.content.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        self.cur.content.append(node)

    def handle_endtag(self, tag):
        node = self.cur
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.content.append(data)


def parse(path: Path) -> Tree:
    return Tree(path.read_text(encoding="utf-8"))


def points(polyline: Node) -> np.ndarray:
    return np.array([[float(v) for v in p.split(",")] for p in polyline.attrs["points"].split()])


def pct(v: float) -> str:
    return "\u2014" if math.isnan(v) else f"{100 * v:.1f}"


def decode(uri: str) -> Image.Image:
    assert uri.startswith(PNG_URI)
    im = Image.open(io.BytesIO(base64.b64decode(uri[len(PNG_URI):], validate=True)))
    im.load()
    assert im.format == "PNG"
    return im


def assert_self_contained(tree: Tree) -> None:
    """No element loads anything from outside the page."""
    for node in tree.root.all("img") + [n for t in ("a", "link", "script", "iframe", "image", "use", "source")
                                        for n in tree.root.all(t)]:
        for key in ("src", "href", "xlink:href"):
            value = node.attrs.get(key)
            assert value is None or value.startswith(("data:", "#")), (node.tag, key, value[:80])
    assert "script" not in tree.tags and "link" not in tree.tags


# -- a hand-made results folder ----------------------------------------------------------------------------------------


def fake_run(folder: Path, cats: dict[str, tuple[np.ndarray, np.ndarray]], checkpoint: str | None = None,
             image_dir: Path | None = None, thresholds: dict[str, float] | None = None) -> Path:
    """results.json and scores.csv as `onenip test` writes them, with image metrics computed from the scores; with
    `thresholds` (per category) also the decisions of the clean protocol (`decision_summary`)."""
    folder.mkdir(parents=True, exist_ok=True)
    image_dir = image_dir or folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows, entries = [], {}
    for c, (cat, (scores, labels)) in enumerate(cats.items()):
        im = image_metrics(scores, labels)
        res = {"image_auroc": im["auroc"], "image_ap": im["ap"], "image_f1max": im["f1_max"],
               "pixel_auroc": math.nan, "pixel_ap": math.nan, "pixel_f1max": math.nan, "pixel_aupro": math.nan}
        entries[cat] = {"images": len(scores), "defective": int(labels.sum()), "pixel_metrics": False, "fused": res}
        for i, (s, y) in enumerate(zip(scores, labels)):
            path = image_dir / f"{c}_{i}.png"
            Image.new("RGB", (300, 200), (40 * c + 20, 5 * i % 255, 200 if y else 60)).save(path)
            rows.append({"image": str(path), "category": cat, "defect": "crack" if y else "good", "label": int(y),
                         "retrieved": cat, "similarity": 0.9, "score_fused": float(s)})
    data = {"protocol": "clean", "checkpoint": checkpoint, "fusion_scale": 1.5, "retrieval_accuracy": 1.0,
            "seconds": {}, "skipped": [], "categories": entries}
    if thresholds is not None:  # adds threshold, normalized and anomalous to each row
        data["decisions"] = decision_summary(rows, thresholds)
    (folder / "results.json").write_text(json.dumps(data, allow_nan=True))
    with (folder / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def two_class(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    return np.round(rng.random(n) + 0.4 * labels, 1), labels  # rounded: many ties


# -- curves ------------------------------------------------------------------------------------------------------------


def test_curves_are_exact_and_match_the_metrics_module() -> None:
    for seed in range(30):
        scores, labels = two_class(seed, n=5 + seed * 7)
        fpr, tpr = roc_curve(scores, labels)
        assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert trapezoid_auroc(fpr, tpr) == pytest.approx(auroc(scores, labels), abs=1e-12)
        recall, precision = pr_curve(scores, labels)
        assert recall[-1] == 1.0 and np.all(np.diff(recall) >= 0) and np.all((precision >= 0) & (precision <= 1))
        assert step_ap(recall, precision) == pytest.approx(average_precision(scores, labels), abs=1e-12)
    # one vertex per distinct score: a perfect ranking is the corner (0, 1)
    fpr, tpr = roc_curve(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert fpr.tolist() == [0, 0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1, 1]
    # a tie between a good and a defective image is one diagonal step (half the area)
    fpr, tpr = roc_curve(np.array([0.5, 0.5]), np.array([0, 1]))
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1] and trapezoid_auroc(fpr, tpr) == 0.5
    with pytest.raises(ValueError, match="both"):
        roc_curve(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="both"):
        pr_curve(np.array([0.1, 0.2]), np.array([0, 0]))


def test_histogram_shares_its_bins() -> None:
    edges, good, bad = histogram(np.array([0.0, 0.1, 0.2]), np.array([0.9, 1.0]))
    assert edges[0] == 0.0 and edges[-1] == 1.0 and good.sum() == 3 and bad.sum() == 2 and good.size == bad.size
    edges, good, bad = histogram(np.array([2.0, 2.0]), np.array([]))  # constant scores still get a bin
    assert good.sum() == 2 and bad.sum() == 0 and edges[0] < 2.0 < edges[-1]


def test_gallery_takes_the_worst_of_each_kind() -> None:
    rows = [ScoreRow(f"b{i}", "c", "crack", 1, "", None, s) for i, s in enumerate([5.0, 1.0, 3.0, 2.0, 4.0])]
    rows += [ScoreRow(f"g{i}", "c", "good", 0, "", None, s) for i, s in enumerate([0.5, 3.5, 0.1])]
    picks = pick_gallery(rows, 4)
    assert [p.image for p in picks] == ["b1", "b3", "g1", "g0"]  # lowest defective, then highest good
    assert [p.image for p in pick_gallery(rows, 7)] == ["b1", "b3", "b2", "b4", "g1", "g0", "g2"]  # all 3 good: 4 bad
    assert len(pick_gallery(rows, 100)) == 8 and pick_gallery(rows, 0) == []
    assert [p.image for p in pick_gallery(rows[:5], 3)] == ["b1", "b3", "b2"]  # no good image: all places defective


def test_gallery_with_decisions_takes_only_the_errors() -> None:
    """With decisions, images judged correctly are never shown: misses lowest first, then false alarms highest first."""
    def row(name: str, label: int, score: float, t: float = 3.0) -> ScoreRow:
        return ScoreRow(name, "c", "crack" if label else "good", label, "c", 0.9, score, threshold=t,
                        normalized=1 - 2 ** (-score / t), anomalous=score > t)

    rows = [row(f"b{i}", 1, s) for i, s in enumerate([5.0, 1.0, 3.0, 2.0, 4.0])]  # b1, b3, b2 missed (<= 3)
    rows += [row(f"g{i}", 0, s) for i, s in enumerate([0.5, 3.5, 0.1, 4.5, 3.2])]  # g3, g1, g4 flagged (> 3)
    assert [p.image for p in pick_gallery(rows, 4)] == ["b1", "b3", "g3", "g1"]
    assert [p.image for p in pick_gallery(rows, 100)] == ["b1", "b3", "b2", "g3", "g1", "g4"]
    assert [p.image for p in pick_gallery(rows, 100, decisions=False)][:3] == ["b1", "b3", "b2"]  # hardest: all 10
    assert len(pick_gallery(rows, 100, decisions=False)) == 10
    assert [p.image for p in pick_gallery(list(reversed(rows)), 4)] == ["b1", "b3", "g3", "g1"]  # order-independent
    assert pick_gallery([r for r in rows if not r.wrong], 8) == []  # nothing judged wrongly: nothing to show
    # a false alarm decided by another (retrieved) category's lower threshold ranks by its normalised score
    rows.append(row("g9", 0, 2.0, t=1.0))
    assert [p.image for p in pick_gallery(rows, 100)][3:] == ["g9", "g3", "g1", "g4"]


# -- hand-made results folders -------------------------------------------------------------------------------------------


def test_names_from_files_are_escaped(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    images = tmp_path / "<script>x&y"  # a folder name is part of every image path
    folder = fake_run(tmp_path / "res", {evil: two_class(1), "plain": two_class(2)}, image_dir=images)
    data = json.loads((folder / "results.json").read_text())
    data["skipped"] = [{"image": "<script>bad.png", "reason": "<b>broken</b>"}]
    (folder / "results.json").write_text(json.dumps(data, allow_nan=True))
    out = make_report(folder, output=tmp_path / "r.html", gallery=4)
    page = out.read_text()
    assert "<script" not in page.lower() and "<b>broken" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    tree = Tree(page)
    assert_self_contained(tree)
    rows = tree.root.all("tbody")[0].all("tr")
    assert [r.all("td")[0].text() for r in rows] == [evil, "plain"]  # escaped, so the browser shows the name as is
    assert {s.attrs["data-category"] for s in tree.root.all("svg", "roc")} == {evil, "plain"}
    files = [f.attrs["title"] for f in tree.root.all("span", "file")]
    assert files and all(f.startswith(str(images)) for f in files)
    shots = tree.root.all("img", "plain")
    assert len(shots) == 8 and all(decode(i.attrs["src"]).size == (256, 171) for i in shots)  # 300x200 shrunk


def test_page_of_a_hand_made_predict_folder(tmp_path: Path) -> None:
    """The predict page shares the test page's escaping, thumbnails and output file: names escaped, overlays inlined
    as RGB PNGs of at most THUMBNAIL pixels, none read from outside the run's folder, report.html inside a folder."""
    run = tmp_path / "predictions"
    (run / "overlays").mkdir(parents=True)
    Image.new("RGBA", (600, 300), (200, 30, 30, 128)).save(run / "overlays" / "a.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "outside.png")
    evil = "<script>alert('x')</script>"
    rows = [{"image": f"/in/{evil}.png", "category": evil, "normalized_score": 0.9, "anomalous": True,
             "overlay": "overlays/a.png"},
            {"image": "/in/b.png", "category": evil, "normalized_score": 0.8, "anomalous": True,
             "overlay": "../outside.png"},
            {"image": "/in/c.png", "category": "plain", "normalized_score": 0.1, "anomalous": False}]
    (run / "predictions.json").write_text(json.dumps({"summary": {"checkpoint": "<b>m</b>"}, "predictions": rows}))
    (tmp_path / "out").mkdir()
    out = make_report(run, output=tmp_path / "out", gallery=4)
    assert out == tmp_path / "out" / "report.html"
    page = out.read_text()
    assert "<script" not in page.lower() and "<b>m" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)" in page
    tree = Tree(page)
    assert_self_contained(tree)
    (img,) = tree.root.all("img")  # the overlay of the folder; the one outside it is not read
    pic = decode(img.attrs["src"])
    assert pic.mode == "RGB" and pic.size == (THUMBNAIL, THUMBNAIL // 2)
    assert page.count("(no overlay: run without --no-images)") == 1


def test_table_curves_and_nan_of_a_hand_made_run(tmp_path: Path) -> None:
    cats = {"a": two_class(3, 60), "b": two_class(4, 25)}
    folder = fake_run(tmp_path / "res", cats)
    tree = parse(make_report(folder, gallery=0))
    assert (folder / "report.html").is_file()
    data = json.loads((folder / "results.json").read_text())
    body = tree.root.all("tbody")[0].all("tr")
    for tr, (cat, entry) in zip(body, data["categories"].items()):
        cells = [td.text() for td in tr.all("td")]
        assert cells == [cat, str(entry["images"]), str(entry["defective"])] + [pct(entry["fused"][m]) for m in METRICS]
    assert body[0].all("td")[-1].text() == "\u2014"  # NaN pixel metric
    mean = tree.root.all("tfoot")[0].all("td")
    want = [np.mean([data["categories"][c]["fused"][m] for c in cats]) for m in METRICS[:3]]
    assert [td.text() for td in mean[3:6]] == [pct(v) for v in want] and mean[6].text() == "\u2014"
    for svg in tree.root.all("svg", "roc"):
        assert float(svg.attrs["data-auroc"]) == pytest.approx(data["categories"][svg.attrs["data-category"]]["fused"]
                                                               ["image_auroc"], abs=1e-12)
    assert not tree.root.all("div", "gallery")


def gallery_of(tree: Tree, cat: str) -> Node:
    return [g for g in tree.root.all("div", "gallery") if g.attrs["data-category"] == cat][0]


def test_gallery_shows_misses_and_false_alarms_at_the_threshold(tmp_path: Path) -> None:
    mixed = (np.array([0.1, 0.2, 0.6, 0.7, 0.3, 0.45, 0.55, 0.9, 0.4, 0.8]), np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]))
    perfect = (np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), np.array([0, 0, 0, 1, 1, 1]))
    images = tmp_path / "images"
    folder = fake_run(tmp_path / "res", {"mixed": mixed, "perfect": perfect}, image_dir=images,
                      thresholds={"mixed": 0.5, "perfect": 0.5})
    tree = parse(make_report(folder, gallery=6))
    assert_self_contained(tree)
    gal = gallery_of(tree, "mixed")
    # misses 0.3 < 0.4 < 0.45 (lowest first), false alarms 0.7 > 0.6 (highest first): 5 errors, the 6th place unused
    files = [f.attrs["title"] for f in gal.all("span", "file")]
    assert files == [str(images / f"0_{i}.png") for i in (4, 8, 5, 3, 2)]
    shots = gal.all("figure", "shot")
    assert [("(missed)" in f.text(), "(false alarm)" in f.text()) for f in shots] == [(True, False)] * 3 + [(False, True)] * 2
    assert not any("(correct)" in f.text() for f in shots)  # nothing judged correctly in the gallery
    assert "1. worst of 3 missed" in shots[0].text() and "1. worst of 2 false alarms" in shots[3].text()
    assert gal.attrs["data-kind"] == "errors" and (gal.attrs["data-misses"], gal.attrs["data-false-alarms"]) == ("3", "2")
    assert "misses and false alarms" in gal.all("h3")[0].text().lower()
    assert "threshold 0.5" in shots[0].text() and "deployed: \u2014 (no model)" in shots[0].text()
    gal = gallery_of(tree, "perfect")
    assert not gal.all("figure") and not gal.all("img")
    assert "no misses or false alarms at the model's threshold" in gal.text()

    # without thresholds (paper protocol) the same ranking is the hardest images, not "misses"
    folder = fake_run(tmp_path / "paper", {"mixed": mixed}, image_dir=images)
    gal = gallery_of(parse(make_report(folder, gallery=4)), "mixed")
    head = gal.all("h3")[0].text()
    assert gal.attrs["data-kind"] == "hardest" and head == "Hardest images (no thresholds in this run)"
    assert "miss" not in head.lower()
    assert [f.attrs["title"] for f in gal.all("span", "file")] == [str(images / f"0_{i}.png") for i in (4, 8, 3, 2)]
    assert all("decision \u2014 (no model)" in f.text() for f in gal.all("figure"))


def threshold_x(svg: Node) -> float:
    lines = svg.all("line", "threshold-line")
    assert len(lines) == 1 and lines[0].attrs["x1"] == lines[0].attrs["x2"]
    return float(lines[0].attrs["x1"])


def test_histogram_marks_the_threshold(tmp_path: Path) -> None:
    left, right = 46, 288  # the plot's pixel range (charts._LEFT, _LEFT + _PW)
    scores, labels = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9]), np.array([0, 0, 0, 1, 1, 1])
    svg = Tree(histogram_svg("c", scores, labels, 0.5)).root.all("svg", "hist")[0]
    assert float(svg.attrs["data-threshold"]) == 0.5 and "threshold 0.5" in svg.all("title")[0].text()
    assert [t.text() for t in svg.all("text", "threshold-label")] == ["threshold"]
    edges = [float(v) for v in svg.attrs["data-edges"].split()]
    assert threshold_x(svg) == pytest.approx(left + (0.5 - edges[0]) / (edges[-1] - edges[0]) * (right - left), abs=0.01)
    for t in (5.0, -3.0):  # outside the scores: the x range is widened, the line stays in the plot
        svg = Tree(histogram_svg("c", scores, labels, t)).root.all("svg", "hist")[0]
        x = threshold_x(svg)
        assert left < x < right
        bars = [float(r.attrs["x"]) + float(r.attrs["width"]) * (t > 0) for r in svg.all("rect") if r.parent.tag == "g"
                and "bars" in r.parent.classes()]
        assert (x > max(bars)) if t > 0 else (x < min(bars))  # beyond every bar, on the threshold's side
        ticks = [float(v.text()) for v in svg.all("text", "tick-label")]
        assert any(abs(v - t) < abs(t) / 2 for v in ticks)  # the axis reaches out to it
    for t in (None, math.nan, math.inf):
        svg = Tree(histogram_svg("c", scores, labels, t)).root.all("svg", "hist")[0]
        assert not svg.all("line", "threshold-line") and "data-threshold" not in svg.attrs
        assert svg.all("title")[0].text() == "Image scores"

    cats = {"a": two_class(7), "b": two_class(8), "c": two_class(9)}
    folder = fake_run(tmp_path / "res", cats, thresholds={"a": 0.7, "b": 9.5, "c": 0.9})
    data = json.loads((folder / "results.json").read_text())
    del data["decisions"]["thresholds"]["c"]  # a category without a threshold gets no line
    (folder / "results.json").write_text(json.dumps(data, allow_nan=True))
    tree = parse(make_report(folder, gallery=0))
    hists = {s.attrs["data-category"]: s for s in tree.root.all("svg", "hist")}
    for cat, t in (("a", 0.7), ("b", 9.5)):
        assert float(hists[cat].attrs["data-threshold"]) == t and left <= threshold_x(hists[cat]) <= right
        assert f"threshold {t:.4g}" in hists[cat].all("title")[0].text()
    assert not hists["c"].all("line", "threshold-line") and "threshold" not in hists["c"].text()
    intro = [s for s in tree.root.all("section", "category") if s.attrs["data-category"] == "a"][0].all("p")[0].text()
    assert "Threshold 0.7 (fused score, marked on the histogram)" in intro

    folder = fake_run(tmp_path / "paper", cats)  # no decisions at all
    assert not parse(make_report(folder, gallery=0)).root.all("line", "threshold-line")


def test_one_class_category_still_renders(tmp_path: Path) -> None:
    folder = fake_run(tmp_path / "res", {"ok": two_class(5), "allgood": (np.array([0.1, 0.3, 0.2]), np.zeros(3, int))})
    tree = parse(make_report(folder, gallery=2))
    roc = [s for s in tree.root.all("svg", "roc") if s.attrs["data-category"] == "allgood"][0]
    assert not roc.all("polyline") and "both good and defective" in roc.text() and "data-auroc" not in roc.attrs
    hist = [s for s in tree.root.all("svg", "hist") if s.attrs["data-category"] == "allgood"][0]
    assert sum(int(v) for v in hist.attrs["data-good"].split()) == 3


def test_missing_or_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        make_report(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"results\.json does not exist"):
        make_report(empty)
    folder = fake_run(tmp_path / "res", {"a": two_class(6)})
    with pytest.raises(OnenipError, match="map 'rec' was not scored.*fused"):
        make_report(folder, map_name="rec")
    csv_text = (folder / "scores.csv").read_text()
    (folder / "scores.csv").write_text(csv_text.replace(",1,a,", ",maybe,a,", 1))
    with pytest.raises(DatasetError, match=r"scores\.csv line \d+ is malformed"):
        make_report(folder)
    (folder / "scores.csv").write_text(csv_text.replace("score_fused", "score_other"))
    with pytest.raises(DatasetError, match=r"scores\.csv is malformed: no column score_fused"):
        make_report(folder)
    (folder / "scores.csv").unlink()
    with pytest.raises(DatasetError, match=r"scores\.csv does not exist"):
        make_report(folder)
    (folder / "results.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"results\.json is not valid JSON"):
        make_report(folder)
    (folder / "results.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"results\.json is malformed"):
        make_report(folder)
    assert not (folder / "report.html").exists()


# -- a real test run ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, gen_data: Path, gen_textures: Path) -> Path:
    """The results folder of `onenip test` on a tiny model of two generated categories (all three maps scored)."""
    root = tmp_path_factory.mktemp("report")
    cfg = make_config(None, small(f"data.roots=[{gen_data}]", f"data.categories={TWO}", f"data.textures={gen_textures}",
                                  "data.holdout=0.2", "train.batch_size=8", "train.max_steps=6", "eval.far=0.05",
                                  f"output_dir={root / 'run'}"))
    Trainer(cfg, progress=False).run()
    run_test(root / "run" / "model.safetensors", overrides=["data.workers=0", "train.device=cpu",
                                                            "eval.maps=[rec, ref, fused]"],
             output=root / "results", progress=False)
    return root / "results"


@pytest.fixture(scope="module")
def report(run: Path) -> Path:
    return make_report(run, device="cpu")


def test_report_of_a_test_run(run: Path, report: Path) -> None:
    assert report == run / "report.html"
    size = report.stat().st_size
    assert 50_000 < size < 4_000_000, size
    data = json.loads((run / "results.json").read_text())
    with (run / "scores.csv").open() as f:
        scores = list(csv.DictReader(f))
    tree = parse(report)
    assert_self_contained(tree)
    cats = list(data["categories"])
    assert cats == ["disc", "weave"]

    # header
    facts = {dt.text(): dd.text() for dt, dd in zip(tree.root.all("dt"), tree.root.all("dd"))}
    assert facts["protocol"] == "clean" and facts["checkpoint"] == data["checkpoint"]
    assert facts["fusion constant c"] == f"{data['fusion_scale']:.6g}"
    assert facts["prompt retrieval accuracy"] == f"{100 * data['retrieval_accuracy']:.2f} %"
    assert facts["test images"].startswith(f"{len(scores)} (") and facts["skipped files"] == "none"
    # the decisions of the deployed model (its thresholds), as results.json and scores.csv count them
    d = data["decisions"]["all"]
    flagged = [r for r in scores if r["anomalous"] == "True"]
    assert d["false_alarms"] == sum(r["label"] == "0" for r in flagged)
    assert d["missed"] == sum(r["label"] == "1" and r["anomalous"] == "False" for r in scores)
    assert facts["decisions at the model's thresholds"].startswith(
        f"{d['false_alarms']} of {d['good']} good images flagged")

    # the table: one row per category, the mean and the pooled ranking, the numbers of results.json
    table = tree.root.all("table", "metrics")
    assert len(table) == 1
    body = table[0].all("tbody")[0].all("tr")
    assert [tr.all("td")[0].text() for tr in body] == cats
    for tr, cat in zip(body, cats):
        assert [td.text() for td in tr.all("td")[3:]] == [pct(data["categories"][cat]["fused"][m]) for m in METRICS]
    foot = table[0].all("tfoot")[0].all("tr")
    assert [tr.attrs["class"] for tr in foot] == ["mean", "pooled"]
    assert [td.text() for td in foot[0].all("td")[3:]] == [pct(data["mean"]["fused"][m]) for m in METRICS]
    pooled = [td.text() for td in foot[1].all("td")[3:]]
    assert pooled == [pct(data["pooled"]["fused"][m]) for m in METRICS[:3]] + ["\u2014"] * 4

    # one ROC, one PR and one histogram per category, exact and consistent with results.json
    for kind in ("roc", "pr", "hist"):
        assert [s.attrs["data-category"] for s in tree.root.all("svg", kind)] == cats
    for svg in tree.root.all("svg", "roc"):
        want = data["categories"][svg.attrs["data-category"]]["fused"]["image_auroc"]
        assert abs(float(svg.attrs["data-auroc"]) - want) < 1e-6
        assert [t.text() for t in svg.all("text", "legend-text")] == [f"AUROC {100 * want:.2f} %"]
        pts = points(svg.all("polyline", "curve")[0])
        assert pts[0].tolist() == [0, 0] and pts[-1].tolist() == [1, 1]
        assert np.all(np.diff(pts, axis=0) >= 0)  # non-decreasing in both coordinates
        assert len(svg.all("text", "tick-label")) >= 10 and len(svg.all("text", "axis-label")) == 2
    for svg in tree.root.all("svg", "pr"):
        cat = svg.attrs["data-category"]
        want = data["categories"][cat]["fused"]["image_ap"]
        assert abs(float(svg.attrs["data-ap"]) - want) < 1e-6
        assert [t.text() for t in svg.all("text", "legend-text")] == [f"AP {100 * want:.2f} %"]
        pts = points(svg.all("polyline", "curve")[0])
        assert pts[0].tolist() == [0, 1] and pts[-1][0] == 1.0
        assert np.all(np.diff(pts[:, 0]) >= 0) and np.all((pts[:, 1] >= 0) & (pts[:, 1] <= 1))
        area = sum((b[0] - a[0]) * b[1] for a, b in zip(pts[:-1], pts[1:]))  # step-wise area of the drawn curve
        assert area == pytest.approx(want, abs=1e-4)  # coordinates are printed with 6 significant digits
    for svg in tree.root.all("svg", "hist"):
        rows = [r for r in scores if r["category"] == svg.attrs["data-category"]]
        good = sum(int(v) for v in svg.attrs["data-good"].split())
        bad = sum(int(v) for v in svg.attrs["data-defective"].split())
        assert (good, bad) == (sum(r["label"] == "0" for r in rows), sum(r["label"] == "1" for r in rows))
        assert len(svg.attrs["data-edges"].split()) == len(svg.attrs["data-good"].split()) + 1
        assert svg.all("g", "good") and svg.all("g", "defective")  # bars of both kinds
        assert [t.text() for t in svg.all("text", "legend-text")] == [f"good ({good})", f"defective ({bad})"]
        threshold = data["decisions"]["thresholds"][svg.attrs["data-category"]]  # marked on the fused scores
        assert float(svg.attrs["data-threshold"]) == threshold and len(svg.all("line", "threshold-line")) == 1
        assert f"threshold {threshold:.4g}" in svg.all("title")[0].text()

    # the gallery: overlays of the misses and false alarms at the model's thresholds, decodable PNGs at most 256 px
    n_errors = 0
    for gal in tree.root.all("div", "gallery"):
        cat = gal.attrs["data-category"]
        want = errors(scores, cat, 8)
        n_errors += len(want)
        assert gal.attrs["data-kind"] == "errors"
        assert [f.attrs["title"] for f in gal.all("span", "file")] == [r["image"] for r in want]
        shots = gal.all("figure", "shot")
        if not want:
            assert "no misses or false alarms at the model's threshold" in gal.text()
        for shot, r in zip(shots, want):
            verdict = "missed" if r["label"] == "1" else "false alarm"
            assert f"({verdict})" in shot.all("span", "tested")[0].text() and "worst of" in shot.text()
        for img in gal.all("img"):
            assert "overlay" in img.classes()
            pic = decode(img.attrs["src"])
            assert pic.mode == "RGB" and max(pic.size) <= THUMBNAIL
        assert all("deployed: score" in s.text() and "retrieved" in s.text() for s in shots)
        assert not gal.all("p", "no-overlay")
    assert len(tree.root.all("div", "gallery")) == 2
    assert n_errors > 0  # the tiny model errs (other tests rely on a gallery with pictures)


def errors(scores: list[dict[str, str]], cat: str, n: int) -> list[dict[str, str]]:
    """The gallery of `cat` as scores.csv's decisions define it: misses (lowest normalised score first), then false
    alarms (highest first), ties by path, half the places each (the misses' half rounded up)."""
    rows = [r for r in scores if r["category"] == cat]
    misses = sorted((r for r in rows if r["label"] == "1" and r["anomalous"] == "False"),
                    key=lambda r: (float(r["normalized"]), r["image"]))
    alarms = sorted((r for r in rows if r["label"] == "0" and r["anomalous"] == "True"),
                    key=lambda r: (-float(r["normalized"]), r["image"]))
    n_bad = min(len(misses), (n + 1) // 2)
    n_good = min(len(alarms), n - n_bad)
    n_bad = min(len(misses), n - n_good)
    return misses[:n_bad] + alarms[:n_good]


def test_report_of_another_map_and_without_gallery(run: Path, tmp_path: Path) -> None:
    tree = parse(make_report(run, output=tmp_path, map_name="rec", gallery=0))  # a folder: report.html inside
    data = json.loads((run / "results.json").read_text())
    assert table_values(tree) == [[pct(data["categories"][c]["rec"][m]) for m in METRICS] for c in data["categories"]]
    for svg in tree.root.all("svg", "roc"):
        assert abs(float(svg.attrs["data-auroc"]) - data["categories"][svg.attrs["data-category"]]["rec"]["image_auroc"]) < 1e-6
    assert not tree.root.all("img") and (tmp_path / "report.html").is_file()


def table_values(tree: Tree) -> list[list[str]]:
    return [[td.text() for td in tr.all("td")[3:]] for tr in tree.root.all("tbody")[0].all("tr")]


def test_report_without_a_usable_checkpoint(run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "results"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("report.html"))
    data = json.loads((moved / "results.json").read_text())
    data["checkpoint"] = str(tmp_path / "gone" / "model.safetensors")
    (moved / "results.json").write_text(json.dumps(data, indent=2, allow_nan=True))
    tree = parse(make_report(moved, gallery=3))
    notes = tree.root.all("p", "no-overlay")
    assert len(notes) == 2 and all("gone/model.safetensors does not exist" in n.text() for n in notes)
    assert len(tree.root.all("table", "metrics")) == 1 and len(tree.root.all("svg", "pr")) == 2  # the page is complete
    with (moved / "scores.csv").open() as f:
        scores = list(csv.DictReader(f))
    gals = tree.root.all("div", "gallery")
    for gal in gals:
        assert len(gal.all("img")) == len(errors(scores, gal.attrs["data-category"], 3))
    gal = [g for g in gals if g.all("img")][0]
    imgs = gal.all("img")
    assert all("plain" in i.classes() for i in imgs)
    source = gal.all("span", "file")[0].attrs["title"]
    plain = load_image(source)
    plain.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(decode(imgs[0].attrs["src"])), np.asarray(plain))  # the image itself, no heat map
    # the test's decision is still shown; the deployed model's is not
    assert all("deployed: \u2014 (no model)" in f.text() and "at the test: normalised" in f.text()
               for f in gal.all("figure"))

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    tree = parse(make_report(moved, output=tmp_path / "junk.html", gallery=2, checkpoint=junk))
    notes = tree.root.all("p", "no-overlay")
    assert len(notes) == 2 and all("cannot be used" in n.text() and "junk.safetensors" in n.text() for n in notes)
    assert all("plain" in i.classes() for i in tree.root.all("img"))


def test_report_says_when_the_tested_model_has_changed(run: Path, tmp_path: Path) -> None:
    data = json.loads((run / "results.json").read_text())
    tested = Path(data["checkpoint"])
    assert data["checkpoint_sha256"] == file_sha256(tested)
    assert "has changed since this test" not in make_report(run, output=tmp_path / "a.html", gallery=1).read_text()
    copy = tmp_path / "model.safetensors"
    shutil.copy(tested, copy)
    assert cli.main(["calibrate", str(copy), "--far", "0.5"]) == 0  # the same model, other thresholds
    moved = tmp_path / "results"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("report.html"))
    data["checkpoint"] = str(copy)
    (moved / "results.json").write_text(json.dumps(data))
    with pytest.warns(OnenipWarning, match="has changed since this test"):  # on the terminal too
        page = make_report(moved, gallery=1)
    assert "has changed since this test" in page.read_text()
    with pytest.raises(ConfigError, match="is an onenip model"):  # never written over a model
        make_report(moved, output=copy, gallery=0)
    parse(page)  # still a well-formed page


# -- rendered by a browser ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_renders_in_headless_chromium(chromium: str, report: Path, tmp_path: Path) -> None:
    browser = chromium
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    url = report.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    tree = Tree(dom.stdout)
    assert len(tree.root.all("table", "metrics")) == 1 and len(tree.root.all("tbody")[0].all("tr")) == 2
    assert len(tree.root.all("svg", "roc")) == 2 and len(tree.root.all("svg", "pr")) == 2
    overlays = len(parse(report).root.all("img", "overlay"))
    assert len(tree.root.all("svg", "hist")) == 2 and len(tree.root.all("img", "overlay")) == overlays > 0

    shot = tmp_path / "shot.png"
    res = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000", url], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pic = np.asarray(Image.open(shot).convert("RGB"))
    assert pic.shape == (2000, 1200, 3)
    colours = np.unique(pic.reshape(-1, 3), axis=0)
    assert len(colours) > 2000, len(colours)  # text, charts and photographs, not a blank page
    head = np.all(pic == (0x1B, 0x3A, 0x6B), axis=2)  # the table head's background colour
    rows = np.flatnonzero(head.sum(axis=1) > 600)  # drawn across the table's width
    assert rows.size >= 10, "the metrics table did not render"
    table = pic[rows[0] : rows[0] + 120, 40:1160]
    assert table.reshape(-1, 3).std(axis=0).max() > 20  # header and cells, not a uniform block
    curve = np.all(pic == (0x1B, 0x3A, 0x6B), axis=2)[rows[-1] + 150 :].sum()
    assert curve > 200  # the curves (same colour) below the table
    Image.fromarray(pic).save(tmp_path / "kept.png")
