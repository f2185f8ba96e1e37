"""Evaluation wiring: maps, masks, labels, prompts, fusion and metrics line up; missing masks; result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onenip.api import make_config
from onenip.detector import Detector
from onenip.evaluate import METRICS, evaluate, write_results
from onenip.model import Maps

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
    if refiner:
        # clean: c from the training images (all background: whiteness 0 -> rec 0, so c = 0);
        # paper: from the test set: (max + min) / 2 = (2 + 0) / 2
        assert res.fusion_scale == pytest.approx(0.0 if protocol == "clean" else 1.0)
    rows = {Path(r["image"]).name + r["category"] + r["defect"]: r for r in res.scores}
    assert len(rows) == 14 and all(r["score_fused"] > 0 for r in res.scores if r["label"] == 1)


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


def test_real_model_both_protocols_and_files(tmp_path: Path, iad_mix: Path) -> None:
    cfg = make_config(None, [
        f"data.roots=[{iad_mix}]", "data.categories=[PA_BDP01_TL, PA_GLA01_TL]", "data.input_size=64",
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
    assert clean.fusion_scale > 0 and paper1.fusion_scale > 0 and clean.fusion_scale != paper1.fusion_scale
    for res in (clean, paper1):
        for entry in res.categories.values():
            assert entry["images"] == 58 and entry["defective"] == 48
            assert all(0.0 <= entry["fused"][m] <= 1.0 for m in METRICS)
    folder = write_results(clean, tmp_path / "results")
    data = json.loads((folder / "results.json").read_text())
    assert set(data["mean"]["fused"]) == set(METRICS)
    md = (folder / "results.md").read_text()
    assert "| PA_BDP01_TL |" in md and "**mean**" in md and "retrieval" in md
    lines = (folder / "scores.csv").read_text().splitlines()
    assert len(lines) == 1 + 116 and lines[0].startswith("image,category,defect,label,retrieved,similarity")


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
    from onenip.evaluate import mean_maps

    a = Maps(rec=torch.zeros(2, 4, 4), ref=torch.ones(2, 4, 4))
    b = Maps(rec=torch.full((2, 4, 4), 2.0), ref=torch.zeros(2, 4, 4))
    m = mean_maps([a, b])
    assert torch.equal(m.rec, torch.ones(2, 4, 4)) and torch.equal(m.ref, torch.full((2, 4, 4), 0.5))
    assert mean_maps([a]) is a
