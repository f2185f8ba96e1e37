"""Known and unknown products on the line: an image of a type the model never saw is reported as unknown (not judged
by the nearest type's threshold; by its type distance or by its colour), a product type can be given instead of
retrieved, and the sensitivity can be changed without a recalibration file. Each test fails without the behaviour it
names."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onenip.data import read_sources
from onenip.data.images import load_batch
from onenip.deploy.predictor import CAPTION_HEIGHT, Predictor, run_predict
from onenip.errors import ConfigError
from onenip.evaluation.calibration import (
    COLOUR_FLOOR,
    COLOUR_MIN_DISTANCE,
    COLOUR_MIN_IMAGES,
    COLOUR_SHRINK,
    colour_model,
)
from onenip.evaluation.evaluate import decision_summary
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel
from onenip.models.scoring import colour_distance, colour_stats, colour_whitening


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


# --------------------------------------------------------------------------------------------------------------------
# The type check's colour half
# --------------------------------------------------------------------------------------------------------------------


def test_colour_stats_read_the_median_colour_and_ignore_a_defect() -> None:
    img = np.empty((2, 3, 64, 64), np.uint8)
    img[:, 0], img[:, 1], img[:, 2] = 200, 120, 40
    img[1, :, 10:30, 10:30] = np.array([0, 255, 255], np.uint8)[:, None, None]  # a defect of another colour, 10 %
    stats = colour_stats(torch.from_numpy(img))
    want = torch.tensor([(200 + 120 + 40) / 3, 200 - 120, (200 + 120) / 2 - 40]) / 255
    assert torch.allclose(stats, want.expand(2, 3), atol=1e-6)
    assert torch.allclose(colour_stats(torch.from_numpy(img).float() / 255), stats, atol=1e-6)  # floats in [0, 1] alike
    tinted = img.copy()
    tinted[:, 2] = 90  # the whole product bluer
    assert float((colour_stats(torch.from_numpy(tinted))[:, 2] - stats[:, 2]).abs().min()) > 0.15


def test_colour_limit_is_the_largest_leave_one_out_distance() -> None:
    rng = np.random.default_rng(0)
    stats = rng.normal([0.5, 0.05, -0.1], [0.03, 0.02, 0.02], (30, 3))
    m = colour_model(stats, 1.5)
    loo = []
    for i in range(len(stats)):
        rest = np.delete(stats, i, axis=0)
        cov = np.cov(rest.T)
        cov += np.diag(COLOUR_SHRINK * np.diag(cov) + COLOUR_FLOOR)
        d = stats[i] - rest.mean(axis=0)
        loo.append(float(np.sqrt(d @ np.linalg.inv(cov) @ d)))
    assert m is not None and m["limit"] == pytest.approx(1.5 * max(loo), rel=1e-9) and m["images"] == 30
    whitening = colour_whitening(torch.tensor([m["mean"]]), torch.tensor([m["precision"]]))
    own = colour_distance(torch.tensor(stats, dtype=torch.float32)[:, :, None], whitening.expand(30, -1, -1))
    d = stats - np.array(m["mean"])  # the whitening's distance is the Mahalanobis distance
    assert own.numpy() == pytest.approx(np.sqrt(np.einsum("ni,ij,nj->n", d, np.array(m["precision"]), d)), rel=1e-4)
    assert float(own.max()) < max(loo)  # the model of all places each image closer: why the limit is leave-one-out
    assert colour_model(stats[:COLOUR_MIN_IMAGES - 1], 1.2) is None  # too few images: no colour check
    alike = colour_model(np.tile(stats[:1], (12, 1)), 1.2)  # normal images of one colour to the grey level
    assert alike is not None and alike["limit"] == pytest.approx(1.2 * COLOUR_MIN_DISTANCE)
    assert np.isfinite(alike["precision"]).all()


def test_the_intensity_spread_does_not_widen_the_colour_tolerance() -> None:
    """Paper variants: the intensity spreads 13x wider than the opponent colours (lighting), and another variant
    differs by 5 grey levels of r - g alone. Each colour keeps its own tolerance, so the variant is beyond the limit
    (a tolerance grown by the mean variance, the intensity's mostly, let it pass), while a brightness within the
    normal spread and a shift under one grey level stay known. A grey product whose colours barely spread at all
    is read to one grey level (COLOUR_FLOOR): 1.5 grey levels off stays known (a quarter-grey-level floor flagged
    it), 6 do not."""
    def distance(m: dict, colour: list[float]) -> float:  # as the deployed model measures it
        whitening = colour_whitening(torch.tensor([m["mean"]]), torch.tensor([m["precision"]]))
        return float(colour_distance(torch.tensor([colour])[:, :, None], whitening)[0])

    paper = colour_model(np.random.default_rng(0).normal([0.6, 0.035, 0.045], [0.04, 0.003, 0.003], (30, 3)), 1.5)
    assert paper is not None
    assert distance(paper, [0.6, 0.035 - 5 / 255, 0.045]) > paper["limit"]  # another variant: unknown
    assert distance(paper, [0.66, 0.035, 0.045]) < paper["limit"]  # brighter by 1.5 of the intensity's spreads: known
    assert distance(paper, [0.6, 0.035 - 0.5 / 255, 0.045]) < paper["limit"]  # half a grey level: known
    grey = colour_model(np.random.default_rng(1).normal([0.5, 0.0, 0.0], [0.002, 0.0005, 0.0005], (30, 3)), 1.5)
    assert grey is not None
    assert distance(grey, [0.5, 1.5 / 255, 0.0]) < grey["limit"] < distance(grey, [0.5, 6 / 255, 0.0])


def test_a_known_product_in_another_colour_is_unknown_by_its_colour(model: Path, gen_data: Path) -> None:
    det = Detector.load(model)
    dep = det.deployment
    assert set(dep.colour_models) == {"disc", "weave"} and dep.calibration["disc"]["colour_margin"] == 1.5
    images = torch.from_numpy(load_batch(good_test_images(gen_data, ["disc", "weave"]), 64))
    tinted = images.clone()
    tinted[:, 1] = (tinted[:, 1].float() * 0.6).to(torch.uint8)  # every image greener-less: magenta cast
    dm = DeployModel(det, dep)
    with torch.no_grad():
        plain, cast = dm(images), dm(tinted)
    limits = dm.colour_limits[plain["category"]]
    assert bool((plain["colour_distance"] <= limits).float().mean() >= 0.9)  # the normal colours pass
    assert bool((cast["colour_distance"] > dm.colour_limits[cast["category"]]).all())  # the cast ones do not
    assert not bool(cast["known"].any()) and not bool(cast["anomalous"].any())  # unknown, and so not judged
    # the same images with the colour half off (eval.colour_margin 0 builds no models): judged by the type distance
    # (each half on its own, the rule of models calibrated before the summed one: tests/test_unknown_rule.py has it)
    off = DeployModel(det, dataclasses.replace(dep, colour_models={}, unknown_level=None))
    with torch.no_grad():
        judged = off(tinted)
    assert torch.equal(judged["known"], judged["type_distance"] <= off.type_limits[judged["category"]])
    assert bool(judged["known"].any())  # so the colour half is what turned them unknown


def test_evaluation_decides_unknown_by_colour_as_the_deployed_model() -> None:
    rows = [{"image": f"{i}.png", "category": "a", "defect": "good", "label": 0, "score_fused": 1.0, "retrieved": "a",
             "type_distance": 0.1, "colour_distance": c} for i, c in enumerate([0.5, 3.0, None])]
    decision_summary(rows, {"a": 2.0}, type_limits={"a": 0.5}, colour_limits={"a": 2.0})
    assert [r["known"] for r in rows] == [True, False, True]  # None: a model without colour models


def test_calibrate_gives_a_model_built_before_the_colour_check_one(model: Path, tmp_path: Path) -> None:
    from onenip.api import calibrate

    det = Detector.load(model)
    built = det.deployment.colour_models
    det.deployment = dataclasses.replace(det.deployment, colour_models={})  # as models built before it were
    old = det.save(tmp_path / "old.safetensors")
    assert Detector.load(old).deployment.colour_models == {}
    _, after, _ = calibrate(old, output=tmp_path / "new.safetensors")
    assert set(after.colour_models) == set(built) == {"disc", "weave"}
    for c in built:  # from the model's training images, as fit builds them
        assert after.colour_models[c]["mean"] == pytest.approx(built[c]["mean"], abs=0.02)
        assert after.calibration[c]["colour_margin"] == 1.5
    kept = calibrate(tmp_path / "new.safetensors", output=tmp_path / "again.safetensors")[1]
    assert kept.colour_models == after.colour_models  # a model with colour models keeps them


def test_calibrate_sets_the_colour_margin_or_turns_the_check_off(model: Path, tmp_path: Path, capsys) -> None:
    from onenip import cli
    from onenip.api import calibrate

    dep = Detector.load(model).deployment
    _, wider, _ = calibrate(model, output=tmp_path / "wide.safetensors", colour_margin=3.0)
    for c, m in dep.colour_models.items():  # limit = margin x a distance of the type's own images: twice 1.5
        assert wider.colour_models[c]["limit"] == pytest.approx(2 * m["limit"], rel=1e-9)
        assert wider.colour_models[c]["mean"] == m["mean"] and wider.calibration[c]["colour_margin"] == 3.0
    assert Detector.load(model).deployment.colour_models == dep.colour_models  # written elsewhere: the model as it was
    assert cli.main(["calibrate", str(tmp_path / "wide.safetensors"), "--colour-margin", "0"]) == 0
    assert "colour check turned off" in capsys.readouterr().out
    off = Detector.load(tmp_path / "wide.safetensors").deployment
    assert off.colour_models == {}
    for c in dep.colour_models:  # the record says off, and keeps no margin or distances of the model it dropped
        assert off.calibration[c]["colour_check"].startswith("off") and "colour_margin" not in off.calibration[c]
    with pytest.raises(ConfigError, match="--colour-margin must be >= 0"):
        calibrate(model, output=tmp_path / "x.safetensors", colour_margin=-1)
    assert not (tmp_path / "x.safetensors").exists()
