"""Prompt-map fusion on trained types (eval.prompt_fusion, `onenip calibrate --prompt-fusion`): each trained type's map
becomes (1 - beta) x the learned map + beta x s_k x its prompt map, with a bank of its prompt-pool images' patches
and a scale s_k set on normal training images; the thresholds are set on the fused maps; evaluation, the deployed
model and its exports compute the same maps. Each test fails without the behaviour it names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import onenip
from onenip import cli
from onenip.api import add_type, calibrate
from onenip.data import read_sources
from onenip.data.images import load_batch
from onenip.deploy.predictor import Predictor
from onenip.errors import ConfigError, DatasetError
from onenip.evaluation.evaluate import fusion_samples, prompt_source
from onenip.models.deployment import Deployment
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel
from onenip.models.scoring import added_type_bank, added_type_map

BETA = 0.5


@pytest.fixture(scope="module")
def fused(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Deployment, Deployment]:
    """The tiny model calibrated with prompt-map fusion at BETA: (its file, the deployment after, the one before)."""
    out = tmp_path_factory.mktemp("fused") / "model.safetensors"
    path, after, before = calibrate(tiny_model, prompt_fusion=BETA, output=out)
    assert path == out
    return out, after, before


def test_weights_and_banks_follow_the_type(tiny_model: Path) -> None:
    dep = Detector.load(tiny_model).deployment
    bank = torch.randn(5, 8)
    fused = Deployment(**{**dep.__dict__, "prompt_fusion": 0.25, "prompt_scales": {"disc": 2.0},
                          "prompt_patches": {"disc": bank, "added": bank[:2]}, "added_types": ["added"],
                          "pool_categories": dep.pool_categories + ["added"],
                          "pool_feats": torch.cat([dep.pool_feats, dep.pool_feats[:1]]),
                          "pool_images": dep.pool_images + ["x.png"]})
    kinds = ["added", "disc", "weave"]
    assert fused.fused_types == ["disc"]  # weave has no bank: not fused
    assert fused.map_weights(kinds).tolist() == [[0.0, 1.0], [0.75, 0.5], [1.0, 0.0]]
    banks, rows = fused.prompt_banks(kinds)
    assert rows.tolist() == [0, 1, -1] and torch.equal(banks[1], bank) and torch.equal(banks[0][:2], bank[:2])
    off = Deployment(**{**fused.__dict__, "prompt_fusion": 0.0})  # beta 0: the bank is kept but not used
    assert off.fused_types == [] and off.map_weights(kinds).tolist()[1] == [1.0, 0.0]
    assert off.prompt_banks(kinds)[1].tolist() == [0, -1, -1]
    with pytest.raises(ConfigError, match=r"beta must be in \[0, 1\], got 1.5"):
        Deployment(**{**dep.__dict__, "prompt_fusion": 1.5})


def test_the_deployed_map_is_the_weighted_sum_of_the_learned_and_the_prompt_map(
        tiny_model: Path, fused: tuple[Path, Deployment, Deployment], gen_batch: np.ndarray) -> None:
    """Against the parts computed on their own: the learned map of the model before, and each image's prompt map
    against the bank of its retrieved type (built here again from that type's pool images)."""
    path, after, before = fused
    assert after.fused_types == ["disc", "weave"] and after.prompt_fusion == BETA
    assert all(s > 0 for s in after.prompt_scales.values())
    det = Detector.load(path)
    plain = Detector.load(tiny_model)
    images = torch.from_numpy(gen_batch)
    with torch.no_grad():
        got = DeployModel(det, det.deployment)(images)
        learned = DeployModel(plain, plain.deployment)(images)
        feats, patches = det.features_and_patches(images)
        pool = load_batch([Path(p) for p in after.pool_images], det.input_size)
        pool_patches = det.features_and_patches(torch.from_numpy(pool))[1]
    assert torch.equal(got["category"], learned["category"])  # retrieval does not change
    for i, k in enumerate(got["category"].tolist()):
        cat = after.categories[k]
        bank = added_type_bank(pool_patches[[j for j, c in enumerate(after.pool_categories) if c == cat]])
        assert torch.allclose(bank, after.prompt_patches[cat], atol=1e-5)
        knn = added_type_map(patches[i:i + 1], bank[None], torch.zeros(1, dtype=torch.int64),
                             det.extractor.patch_widths, det.input_size)[0]
        want = (1 - BETA) * learned["map"][i] + BETA * after.prompt_scales[cat] * knn
        assert torch.allclose(got["map"][i], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got["map"], learned["map"], atol=1e-3)  # the fusion changes the maps


def test_each_scale_brings_the_prompt_map_to_the_learned_maps_scale(tiny_model: Path,
                                                                   fused: tuple[Path, Deployment, Deployment]) -> None:
    """s_k = mean per-image maximum of the learned map / that of the prompt map, on the type's normal training images
    that the fusion constant is set on (outside the prompt pool), each judged by the type it retrieves."""
    path, after, _ = fused
    plain = Detector.load(tiny_model)
    train = prompt_source(plain, plain.cfg)
    pool = [s for s in train if str(s.image) in set(after.pool_images)]
    normal = fusion_samples(train, pool, plain.cfg)
    assert normal and not {s.image for s in normal} & {s.image for s in pool}
    images = torch.from_numpy(load_batch([s.image for s in normal], plain.input_size))
    prompt_only = Deployment(**{**after.__dict__, "prompt_fusion": 1.0,
                                "prompt_scales": {t: 1.0 for t in after.prompt_scales}})
    with torch.no_grad():
        learned = DeployModel(plain, plain.deployment)(images)["map"].flatten(1).amax(1)
        prompt = DeployModel(plain, prompt_only)(images)["map"].flatten(1).amax(1)
    for cat in ("disc", "weave"):
        ix = [i for i, s in enumerate(normal) if s.category == cat]
        assert after.prompt_scales[cat] == pytest.approx(float(learned[ix].mean() / prompt[ix].mean()), rel=1e-5)


def test_thresholds_are_set_on_the_fused_maps_and_evaluation_judges_as_predict(
        fused: tuple[Path, Deployment, Deployment], gen_data: Path, tmp_path: Path) -> None:
    path, after, before = fused
    det = Detector.load(path)
    held = [Path(p) for p in det.extra["holdout"]]
    for cat in ("disc", "weave"):
        mine = [p for p in held if p.parents[2].name == cat]
        preds = Predictor(det, device="cpu", product_type=cat).predict(mine)
        assert after.calibration[cat]["normal_scores"] == pytest.approx(sorted(p.score for p in preds), rel=1e-4)
        assert after.thresholds[cat] != before.thresholds[cat]
    assert det.cfg.eval.prompt_fusion == BETA  # the model's setting goes with it
    res = onenip.test(path, overrides=[f"data.roots=[{gen_data}]"], output=tmp_path / "res", progress=False)
    test = [s.image for s in read_sources([str(gen_data)], "test", ["disc", "weave"])]
    preds = Predictor.load(path, device="cpu").predict(test)
    rows = {r["image"]: r for r in res.scores}
    assert [rows[str(p.source)]["score_fused"] for p in preds] == pytest.approx([p.score for p in preds], rel=1e-4)
    assert [rows[str(p.source)]["anomalous"] for p in preds] == [p.anomalous for p in preds]


def test_another_beta_in_test_is_refused_with_the_fix(fused: tuple[Path, Deployment, Deployment], gen_data: Path,
                                                     tmp_path: Path) -> None:
    path, _, _ = fused
    with pytest.raises(ConfigError, match=r"eval.prompt_fusion is 0.3, but the model fuses its prompt maps at 0.5.*"
                                          r"--prompt-fusion 0.3"):
        onenip.test(path, overrides=[f"data.roots=[{gen_data}]", "eval.prompt_fusion=0.3"], output=tmp_path / "r",
                    progress=False)


def test_calibrate_changes_beta_alone_or_turns_fusion_off(tiny_model: Path, fused: tuple[Path, Deployment, Deployment],
                                                          gen_batch: np.ndarray, tmp_path: Path) -> None:
    path, after, _ = fused
    _, quarter, _ = calibrate(path, prompt_fusion=0.25, output=tmp_path / "q.safetensors")
    assert quarter.prompt_fusion == 0.25 and quarter.prompt_scales == after.prompt_scales  # banks and scales kept
    assert all(torch.equal(quarter.prompt_patches[t], after.prompt_patches[t]) for t in after.fused_types)
    _, off, _ = calibrate(path, prompt_fusion=0, output=tmp_path / "off.safetensors")
    assert off.prompt_fusion == 0 and off.prompt_patches == {} and off.prompt_scales == {}
    plain, back = Detector.load(tiny_model), Detector.load(tmp_path / "off.safetensors")
    for cat in ("disc", "weave"):  # the held-out scores the thresholds rest on are the learned map's again
        assert off.calibration[cat]["normal_scores"] == pytest.approx(
            plain.deployment.calibration[cat]["normal_scores"], rel=1e-5)
    images = torch.from_numpy(gen_batch)
    with torch.no_grad():  # the learned map again, exactly
        assert torch.equal(DeployModel(back, back.deployment)(images)["map"],
                           DeployModel(plain, plain.deployment)(images)["map"])
    versions = {}
    for name in ("q", "off"):
        from safetensors import safe_open

        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            versions[name] = json.loads(f.metadata()["onenip"])["version"]
    assert versions == {"q": 3, "off": 1}  # an older onenip refuses a fused model by its version


def test_an_added_type_on_a_fused_model_keeps_its_prompt_map_alone(fused: tuple[Path, Deployment, Deployment],
                                                                   gen_data: Path, tmp_path: Path) -> None:
    path, after, _ = fused
    grain = [s.image for s in read_sources([str(gen_data)], "train", ["grain"])][:3]
    out, dep = add_type(path, "grain", grain, output=tmp_path / "g.safetensors")
    assert dep.fused_types == ["disc", "weave"] and dep.added_types == ["grain"]
    assert dep.map_weights(dep.categories).flatten().tolist() == pytest.approx(
        [1 - BETA, BETA * after.prompt_scales["disc"], 0.0, 1.0, 1 - BETA, BETA * after.prompt_scales["weave"]])
    banks, rows = dep.prompt_banks(dep.categories)
    assert rows.tolist() == [1, 0, 2] and banks.shape[0] == 3  # the added type first, then the fused ones


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exports_compute_the_fused_map(fused: tuple[Path, Deployment, Deployment], gen_batch: np.ndarray,
                                       tmp_path: Path, fmt: str) -> None:
    """Several banks, each image gathering its own: the exported graph computes what PyTorch does."""
    import importlib.util

    from onenip.deploy.export import export_model
    from onenip.deploy.runtimes import open_runtime

    needs = {"onnx": "onnxruntime", "openvino": "openvino"}[fmt]
    if importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    path, _, _ = fused
    runtime = open_runtime(export_model(path, fmt, tmp_path / ("m.onnx" if fmt == "onnx" else "m.xml")), threads=1)
    det = Detector.load(path)
    with torch.no_grad():
        want = DeployModel(det, det.deployment)(torch.from_numpy(gen_batch))
    got = runtime.run(gen_batch)
    np.testing.assert_allclose(got["map"], want["map"].numpy(), rtol=1e-5, atol=1e-4)  # maps of ~100 here
    np.testing.assert_allclose(got["score"], want["score"].numpy(), rtol=1e-4)


def test_fit_fuses_before_it_sets_the_thresholds(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    from onenip.api import make_config
    from onenip.demo.run import tiny_config
    from onenip.training.trainer import Trainer

    cfg = make_config(None, [f"data.roots=[{gen_data}]", f"data.textures={gen_textures}", *tiny_config(),
                             "train.max_steps=1", "eval.prompt_fusion=0.5", f"output_dir={tmp_path / 'run'}"])
    Trainer(cfg, progress=False).run()
    det = Detector.load(tmp_path / "run" / "model.safetensors")
    dep = det.deployment
    assert dep.fused_types == ["disc", "weave"] and dep.prompt_fusion == 0.5
    held = [Path(p) for p in det.extra["holdout"] if Path(p).parents[2].name == "disc"]
    preds = Predictor(det, device="cpu", product_type="disc").predict(held)
    assert dep.calibration["disc"]["normal_scores"] == pytest.approx(sorted(p.score for p in preds), rel=1e-4)


def test_bad_input_is_named(tiny_model: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["calibrate", str(tiny_model), "--prompt-fusion", "1.5", "--output", str(tmp_path / "a.st")]) == 2
    assert "--prompt-fusion (the prompt map's weight) must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "a.st").exists()
    # a model whose prompt-pool images are gone: named, nothing written
    copy = tmp_path / "model.safetensors"
    shutil.copy(tiny_model, copy)
    det = Detector.load(copy)
    det.deployment.pool_images = [str(tmp_path / "gone" / Path(p).name) for p in det.deployment.pool_images]
    det.save(copy)
    with pytest.raises(DatasetError, match=r"prompt-pool images, and \d+ of them are not there: .*gone"):
        calibrate(copy, prompt_fusion=0.5, output=tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    # the paper protocol scores the learned maps of given prompts: fusion with it is refused, at fit and before any work
    from onenip.api import make_config

    with pytest.raises(ConfigError, match="eval.prompt_fusion .* eval.protocol=clean"):
        make_config(None, ["eval.protocol=paper", "eval.prompt_fusion=0.25"])
    det = Detector.load(tiny_model)
    det.cfg.eval.protocol = "paper"
    det.save(copy)
    with pytest.raises(ConfigError, match=r"eval.prompt_fusion \(0.5\) fuses the deployed model's prompt maps.*"
                                          r"eval.protocol=clean"):
        calibrate(copy, prompt_fusion=0.5, output=tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_held_out_scores_of_another_map_are_not_kept(fused: tuple[Path, Deployment, Deployment], gen_data: Path,
                                                     tmp_path: Path) -> None:
    """Thresholds set F1-optimal on a labelled folder keep the held-out normal scores (for `predict --far` later) only
    while the map stays the same: after fusion changes, the old ones would set thresholds on another map."""
    path, after, _ = fused
    val = tmp_path / "val"
    for cat in ("disc", "weave"):
        shutil.copytree(gen_data / cat, val / cat)
    _, same, _ = calibrate(path, val_roots=[val], output=tmp_path / "same.safetensors")
    assert same.calibration["disc"]["normal_scores"] == after.calibration["disc"]["normal_scores"]
    _, changed, _ = calibrate(path, val_roots=[val], prompt_fusion=0.25, output=tmp_path / "changed.safetensors")
    assert "normal_scores" not in changed.calibration["disc"] and changed.calibration["disc"]["method"] == "f1"
    shutil.rmtree(val / "weave")  # weave keeps its threshold (no calibration images), not its old map's scores
    with pytest.warns(UserWarning, match="for weave set on the map before prompt-map fusion changed from 0.5 to 0.25"):
        _, kept, _ = calibrate(path, val_roots=[val], prompt_fusion=0.25, output=tmp_path / "kept.safetensors")
    assert kept.thresholds["weave"] == after.thresholds["weave"] and "normal_scores" not in kept.calibration["weave"]
