"""Known and unknown products on the line: an image of a type the model never saw is reported as unknown (not judged
by the nearest type's threshold), a product type can be given instead of retrieved, and the sensitivity can be changed
without a recalibration file. Each test fails without the behaviour it names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip.data import read_sources
from onenip.deploy.predictor import CAPTION_HEIGHT, Predictor, run_predict
from onenip.errors import ConfigError
from onenip.models.detector import Detector


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    return tiny_model


def good_test_images(gen_data: Path, cats: list[str]) -> list[Path]:
    return [s.image for s in read_sources([str(gen_data)], "test", cats) if s.label == 0]


def test_images_of_types_the_model_never_saw_are_unknown(model: Path, gen_data: Path) -> None:
    dep = Detector.load(model).deployment
    assert set(dep.type_thresholds) == {"disc", "weave"} and all(math.isfinite(t) for t in dep.type_thresholds.values())
    assert dep.calibration["disc"]["type_images"] > 0 and dep.calibration["disc"]["type_margin"] == 1.2
    predictor = Predictor.load(model, device="cpu")
    unseen = predictor.predict(good_test_images(gen_data, ["bracket", "grain"]))
    known = predictor.predict(good_test_images(gen_data, ["disc", "weave"]))
    assert sum(not p.known for p in unseen) >= 0.9 * len(unseen)  # another product: not judged
    assert all(p.decision == "unknown" and not p.anomalous for p in unseen if not p.known)
    assert sum(p.known for p in known) >= 0.9 * len(known)
    assert {p.row()["decision"] for p in unseen} <= {"unknown", "good", "defective"}


def test_a_given_product_type_is_used_instead_of_retrieval(model: Path, gen_data: Path) -> None:
    weave = good_test_images(gen_data, ["weave"])
    as_disc = Predictor(Detector.load(model), device="cpu", product_type="disc")
    preds = as_disc.predict(weave)
    assert {p.category for p in preds} == {"disc"}  # the type's prompt and threshold, whatever the image resembles
    assert sum(not p.known for p in preds) >= 0.9 * len(preds)  # and the type check says it is not a disc
    with pytest.raises(ConfigError, match="--type 'bottle' is not one of the model's product types: disc, weave"):
        Predictor(Detector.load(model), device="cpu", product_type="bottle")


def test_sensitivity_without_a_recalibration_file(model: Path, gen_data: Path) -> None:
    det = Detector.load(model)
    dep = det.deployment
    images = good_test_images(gen_data, ["disc", "weave"])
    base = Predictor(det, device="cpu").predict(images)
    stricter = Predictor(Detector.load(model), device="cpu", level=0.75).predict(images)
    for a, b in zip(base, stricter):  # level 0.75: the threshold x -log2(0.25) = 2
        assert b.threshold == pytest.approx(2 * a.threshold, rel=1e-6)
        assert b.normalized <= a.normalized and (not b.anomalous or a.anomalous)
    at_zero = Predictor(Detector.load(model), device="cpu", far=0.0)
    scores = dep.calibration["disc"]["normal_scores"]
    assert len(scores) == dep.calibration["disc"]["normal_images"] > 0
    assert float(at_zero.model.thresholds[at_zero.categories.index("disc")]) == pytest.approx(max(scores), rel=1e-6)
    with pytest.raises(ConfigError, match="--threshold must be a normalised score between 0 and 1"):
        Predictor(Detector.load(model), device="cpu", level=1.5)


def test_predict_writes_decisions_and_captioned_overlays(model: Path, gen_data: Path, tmp_path: Path) -> None:
    images = [str(p) for p in good_test_images(gen_data, ["disc", "grain"])[:6]]
    rows = run_predict(model, images, tmp_path / "out", device="cpu", progress=False)
    assert {r["decision"] for r in rows} <= {"good", "defective", "unknown"} and "known" in rows[0]
    over = np.asarray(Image.open(tmp_path / "out" / rows[0]["overlay"]))
    size = Image.open(images[0]).size
    assert over.shape[:2] == (size[1] + CAPTION_HEIGHT, size[0])  # the image, then the caption with the legend
    assert "unknown" in (tmp_path / "out" / "predictions.json").read_text()


def test_report_of_a_predict_folder(model: Path, gen_data: Path, tmp_path: Path) -> None:
    from onenip import cli

    images = [str(p) for p in good_test_images(gen_data, ["disc", "grain"])[:6]]
    out = tmp_path / "out"
    rows = run_predict(model, images, out, device="cpu", progress=False)
    assert cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Predictions:" in page and "unknown type" in page and page.count("data:image/png;base64,") >= 1
    assert "http://" not in page and "https://" not in page  # self-contained
    counts = {d: sum(r["decision"] == d for r in rows) for d in ("good", "defective", "unknown")}
    assert sum(counts.values()) == 6
    for cat in {r["category"] for r in rows}:  # each type's row of the table shows its counts
        mine = [r for r in rows if r["category"] == cat]
        cells = [len(mine)] + [sum(r["decision"] == d for r in mine) for d in ("good", "defective", "unknown")]
        assert f"<tr><td>{cat}</td>" + "".join(f"<td>{n}</td>" for n in cells) + "</tr>" in page
    # a rerun of predict into the folder removes that report with the run it showed
    run_predict(model, images[:2], out, device="cpu", progress=False)
    assert not (out / "report.html").exists()
