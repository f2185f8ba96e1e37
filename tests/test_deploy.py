"""Deployment: thresholds, normalised scores, the deployable module, `Predictor`, `onenip predict` and `calibrate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GEN_TRAIN
from PIL import Image

from onenip import cli
from onenip.api import make_config
from onenip.checkpoint import checkpoint_file, load_checkpoint
from onenip.config import Config
from onenip.data import Sample, read_sources
from onenip.deploy.predictor import (
    Prediction,
    Predictor,
    _output_names,
    _retire_earlier_run,
    expand_inputs,
    overlay,
    run_predict,
    thresholds_at,
)
from onenip.errors import CheckpointError, ConfigError, DatasetError
from onenip.evaluation.calibration import (
    build_deployment,
    calibrate_f1,
    deployment_scores,
    far_threshold,
    split_holdout,
)
from onenip.evaluation.evaluate import build_prompt_pool
from onenip.evaluation.metrics import f1_max
from onenip.models.deployment import Deployment
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel
from onenip.models.scoring import decide, normalize_score
from onenip.training.trainer import Trainer

TWO = "[disc, weave]"  # two generated categories: an object and a texture


def small(*extra: str) -> list[str]:
    return ["data.input_size=64", "data.workers=0", "backbone.name=tf_efficientnet_lite0",
            "backbone.weights=efficientnet-lite", "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4",
            "model.refiner_channels=32", "train.device=cpu", "eval.batch_size=16", *extra]


# -- thresholds ---------------------------------------------------------------------------------------------------------


def test_far_threshold_counts_false_alarms() -> None:
    rng = np.random.default_rng(0)
    s = rng.random(200)
    for far, k in ((0.05, 10), (0.01, 2), (0.0, 0), (0.004, 0)):
        t = far_threshold(s, far)
        assert int((s > t).sum()) == k
        assert t in s  # a normal score, not an interpolation
    ties = np.array([1.0] * 50 + [2.0] * 50)
    assert far_threshold(ties, 0.1) == 2.0  # ties cannot be split: no false alarm rather than 50 %
    with pytest.raises(ValueError):
        far_threshold(np.array([]), 0.1)


def test_f1_threshold_reproduces_f1_max_with_strict_rule() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + labels * 0.6, 2)  # ties included
    thr, info = calibrate_f1({"c": scores}, {"c": labels})
    pred = scores > thr["c"]
    tp, fp, fn = np.sum(pred & (labels == 1)), np.sum(pred & (labels == 0)), np.sum(~pred & (labels == 1))
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1_max(scores, labels)[0]) == pytest.approx(info["c"]["f1"])


def test_normalized_score() -> None:
    assert normalize_score(2.0, 2.0) == pytest.approx(0.5)
    assert normalize_score(0.0, 2.0) == 0.0
    x = np.linspace(0, 10, 50)
    n = normalize_score(x, 3.0)
    assert np.all(np.diff(n) > 0) and n.max() < 1.0


def test_decide_on_tensors_and_arrays_alike() -> None:
    score = [0.5, 2.0, 3.0, 3.0, 0.0, 1e-3]
    threshold = [1.0, 2.0, 2.0, 2.0, 0.0, 0.0]
    known = [True, True, True, False, True, True]
    n_np, a_np = decide(np.array(score), np.array(threshold), np.array(known))
    n_t, a_t = decide(torch.tensor(score), torch.tensor(threshold), torch.tensor(known))
    assert isinstance(n_np, np.ndarray) and isinstance(a_np, np.ndarray) and a_np.dtype == bool
    assert isinstance(n_t, torch.Tensor) and isinstance(a_t, torch.Tensor) and a_t.dtype == torch.bool
    # at the threshold: not above it; an unknown type: not judged; a zero threshold: floored, no NaN
    assert a_np.tolist() == a_t.tolist() == [False, False, True, False, False, True]
    np.testing.assert_allclose(n_t.numpy(), n_np, rtol=1e-6)
    assert n_np[:5] == pytest.approx([1 - 2**-0.5, 0.5, 1 - 2**-1.5, 1 - 2**-1.5, 0.0]) and n_np[5] == 1.0


def test_thresholds_at_takes_plain_mappings() -> None:
    thresholds = {"a": 2.0, "b": 4.0}
    normal = {"a": [0.1 * i for i in range(1, 21)], "b": None}
    assert thresholds_at(thresholds, normal, ["b", "a"]) == [4.0, 2.0]  # in the order asked
    assert thresholds_at(thresholds, normal, ["a", "b"], level=0.75) == pytest.approx([4.0, 8.0])  # x -log2(1 - 0.75)
    assert thresholds_at(thresholds, normal, ["a"], far=0.1) == [far_threshold(np.array(normal["a"]), 0.1)]
    with pytest.raises(ConfigError, match="no held-out normal scores for b"):
        thresholds_at(thresholds, normal, ["a", "b"], far=0.1)
    with pytest.raises(ConfigError, match="--threshold must be a normalised score between 0 and 1"):
        thresholds_at(thresholds, normal, ["a"], level=1.0)
    dep = Deployment(pool_feats=torch.zeros(2, 1, 1, 1), pool_categories=["a", "b"], pool_images=["a.png", "b.png"],
                     fusion_scale=None, thresholds=thresholds,
                     calibration={"a": {"normal_scores": normal["a"], "far": 0.1}, "b": {"far": 0.1}})
    assert dep.normal_scores == {"a": normal["a"]}


def test_split_holdout_per_category(gen_data: Path) -> None:
    samples = read_sources([str(gen_data)], "train", ["disc", "weave"])
    train, held = split_holdout(samples, 0.25, seed=3)
    assert not ({s.image for s in train} & {s.image for s in held})
    for cat in ("disc", "weave"):
        n = sum(s.category == cat for s in samples)
        assert sum(s.category == cat for s in held) == n // 4
    again = split_holdout(samples, 0.25, seed=3)[1]
    assert [s.image for s in again] == [s.image for s in held]
    one = split_holdout(samples[:1], 0.9, seed=0)
    assert len(one[0]) == 1 and one[1] == []  # keeps at least one image to train on


# -- the deployable module ----------------------------------------------------------------------------------------------


def deployed(cfg: Config) -> tuple[Detector, Deployment, list[Sample], torch.Tensor]:
    """An untrained model (seed 0) of `cfg` deployed on disc and weave: detector, deployment, the training
    samples and every second test image as a uint8 batch."""
    from onenip.data.tensors import SampleImages

    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    train = read_sources(cfg.data.roots, "train", ["disc", "weave"])
    dep = build_deployment(det, train[::5], train[1::10], far=0.1, cfg=cfg)
    test = read_sources(cfg.data.roots, "test", ["disc", "weave"])[::2]
    return det, dep, train, torch.stack([SampleImages(test, 64)[i]["image"] for i in range(len(test))])


@pytest.mark.parametrize("arch", ["onenip", "static-prompt"])
def test_deploy_model_decides_by_the_threshold_of_the_retrieved_category(gen_data: Path, arch: str) -> None:
    cfg = make_config(None, small(f"data.roots=[{gen_data}]", f"data.categories={TWO}", "eval.prompt_pool=3",
                                  f"model.arch={arch}", *(["train.prompt=none"] if arch == "uniad" else [])))
    det, dep, train, images = deployed(cfg)
    model = DeployModel(det, dep)
    # the maps and scores are those of onenip.models.scoring, the functions evaluation calls: one code path, so no
    # comparison with evaluation here; what the module adds is retrieval, prompt caching and the decision
    with torch.no_grad():
        out = model(images)
        pool = build_prompt_pool(det, train[::5], cfg)
        j, _ = pool.retrieve(det.features(images))
    assert [model.categories[i] for i in out["category"].tolist()] == [pool.categories[i] for i in j.tolist()]
    thr = torch.tensor([dep.thresholds[model.categories[i]] for i in out["category"].tolist()])
    assert torch.equal(out["anomalous"], out["score"] > thr)
    torch.testing.assert_close(out["normalized"], 1 - 2 ** (-out["score"] / thr))
    # the same function without the cached prompt encodings, and on the fast path (channels-last on the CPU)
    for other in (DeployModel(det, dep, cache_prompts=False), DeployModel(det, dep).optimize()):
        with torch.no_grad():
            res = other(images)
        torch.testing.assert_close(res["map"], out["map"], rtol=1e-4, atol=1e-4)
        assert torch.equal(res["category"], out["category"])
    assert "pool_encoded" not in dict(DeployModel(det, dep, cache_prompts=False).named_buffers())


@pytest.mark.slow
def test_compiled_deploy_model_gives_the_eager_maps_and_decisions(gen_data: Path) -> None:
    """torch.compile of the deployed forward (`onenip predict --compile`, the fast inference of benchmarks/speed.py)
    computes what the eager module computes."""
    det, dep, _, images = deployed(make_config(None, small(f"data.roots=[{gen_data}]", f"data.categories={TWO}",
                                                           "eval.prompt_pool=3")))
    eager, compiled = DeployModel(det, dep).optimize(), DeployModel(det, dep).optimize("default")
    with torch.no_grad():
        a, b = eager(images), compiled(images)
        again = compiled(images[:3])  # another batch size: a second graph (dynamic=False)
    assert a.keys() == b.keys()
    torch.testing.assert_close(b["map"], a["map"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["score"], a["score"], rtol=1e-4, atol=1e-5)
    for k in ("category", "anomalous"):
        assert torch.equal(b[k], a[k]), k
    torch.testing.assert_close(again["map"], a["map"][:3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("arch", "retrieval"), [("onenip", "nearest"), ("uniad", "nearest"), ("onenip", "type_mean")])
def test_clean_evaluation_scores_what_the_deployed_model_scores(gen_data: Path, arch: str, retrieval: str) -> None:
    """`onenip test` (clean protocol) measures the model `onenip predict` runs: the same prompt pool and fusion
    constant, drawn from the training images less the held-out ones and from every category of the model, also when
    only one category is evaluated (a pool of that category alone would tell retrieval the answer); and it decides
    each image as predict does, with the threshold of the retrieved category (a model without prompts too)."""
    from onenip.data.tensors import SampleImages
    from onenip.evaluation.evaluate import evaluate

    cats = ["bracket", "disc", "weave"]
    cfg = make_config(None, small(f"data.roots=[{gen_data}]", f"data.categories=[{', '.join(cats)}]", "eval.prompt_pool=3",
                                  "data.holdout=0.25", f"model.arch={arch}", f"eval.retrieval={retrieval}",
                                  *(["train.prompt=none"] if arch == "uniad" else [])))
    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    # a quarter held out: five normal images per category set each threshold (two would often sit below every score)
    train, held = split_holdout(read_sources(cfg.data.roots, "train", cats), cfg.data.holdout, cfg.train.seed)
    assert held
    det.extra.update(categories=cats, holdout=[str(s.image) for s in held])  # what Trainer records
    det.deployment = build_deployment(det, train, held, far=0.1, cfg=cfg)
    cfg.data.categories = ["weave"]
    res = evaluate(det, cfg, progress=False)
    assert res.fusion_scale == pytest.approx(det.deployment.fusion_scale, rel=1e-6)
    test = read_sources(cfg.data.roots, "test", ["weave"])
    images = torch.stack([SampleImages(test, 64)[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        out = DeployModel(det, det.deployment)(images)
    rows = {r["image"]: r for r in res.scores}
    np.testing.assert_allclose([rows[str(s.image)]["score_fused"] for s in test], out["score"].numpy(), rtol=1e-4)
    deployed = [det.deployment.categories[i] for i in out["category"].tolist()]
    assert [rows[str(s.image)]["retrieved"] for s in test] == deployed
    assert [rows[str(s.image)]["anomalous"] for s in test] == out["anomalous"].tolist()
    assert [rows[str(s.image)]["known"] for s in test] == out["known"].tolist()  # the product-type check too
    np.testing.assert_allclose([rows[str(s.image)]["type_distance"] for s in test], out["type_distance"].numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([rows[str(s.image)]["normalized"] for s in test], out["normalized"].numpy(), rtol=1e-4)
    labels = np.array([s.label for s in test])
    flagged = out["anomalous"].numpy()
    assert 0 < flagged.sum() < len(test)  # a random model: some of each, so the counts below are not trivially zero
    assert res.decisions["categories"]["weave"] == {
        "good": int((labels == 0).sum()), "false_alarms": int((flagged & (labels == 0)).sum()),
        "defective": int(labels.sum()), "missed": int((~flagged & (labels == 1)).sum()),
        "unknown": int((~out["known"].numpy()).sum())}
    assert res.decisions["calibration"]["weave"]["method"] == "false_alarm_rate"
    # another prompt pool than the deployment's: the evaluation no longer scores what predict scores, so no decisions
    cfg.eval.prompt_pool = 2
    other = evaluate(det, cfg, progress=False)
    assert other.decisions is None and "prompt pool differs" in other.decisions_note


def test_threshold_holds_its_false_alarm_rate_on_new_normal_images(tmp_path: Path) -> None:
    """Thresholds set at a false alarm rate on 300 normal images flag about that rate of 300 others (binomial spread:
    300 images at 5 % -> standard deviation 1.3 %). The normal images: 620 generated grain images (more than the
    session's generated dataset holds), drawn independently, as new normal images in deployment are."""
    from onenip.demo.dataset import render_good

    good = tmp_path / "normals" / "grain" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(620):
        Image.fromarray(render_good("grain", (11, i), 64)).save(good / f"{i:03d}.png", compress_level=1)
    cfg = make_config(None, small(f"data.roots=[{tmp_path / 'normals'}]", "data.categories=[grain]", "eval.prompt_pool=1"))
    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    normals = read_sources(cfg.data.roots, "train", ["grain"])
    assert len(normals) == 620
    rng = np.random.default_rng(0)
    order = rng.permutation(len(normals))
    pool_part = [normals[i] for i in order[:20]]
    calib = [normals[i] for i in order[20:320]]
    check = [normals[i] for i in order[320:620]]
    for far in (0.05, 0.2):
        dep = build_deployment(det, pool_part, calib, far=far, cfg=cfg)
        model = DeployModel(det, dep)
        scores = deployment_scores(model, check, 32)["grain"]
        rate = float(np.mean(scores > dep.thresholds["grain"]))
        print(f"far {far}: measured {rate:.3f} on {len(check)} new normal images")
        assert abs(rate - far) < 0.045 + far * 0.25, (far, rate)


# -- a trained model end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gen_data: Path, gen_textures: Path) -> Path:
    run = tmp_path_factory.mktemp("deploy") / "run"
    cfg = make_config(None, small(f"data.roots=[{gen_data}]", f"data.categories={TWO}", f"data.textures={gen_textures}",
                                  "data.holdout=0.2", "train.batch_size=8", "train.max_steps=6", "eval.far=0.05",
                                  f"output_dir={run}"))
    Trainer(cfg, progress=False).run()
    return run / "model.safetensors"


def test_trained_model_carries_its_deployment(trained: Path) -> None:
    det = Detector.load(trained)
    dep = det.deployment
    assert dep is not None and dep.categories == ["disc", "weave"]
    assert dep.pool_feats.shape[0] == len(dep.pool_categories) and dep.fusion_scale > 0
    for cat in dep.categories:
        assert np.isfinite(dep.thresholds[cat]) and dep.thresholds[cat] > 0
        assert dep.calibration[cat]["method"] == "false_alarm_rate" and dep.calibration[cat]["far"] == 0.05
    assert dep.calibration["disc"]["normal_images"] == GEN_TRAIN // 5  # the held-out part of disc's training images
    assert len(det.extra["holdout"]) == 2 * (GEN_TRAIN // 5)


def test_predictor_inputs_and_outputs(trained: Path, gen_data: Path, tmp_path: Path) -> None:
    pred = Predictor.load(trained, device="cpu", batch_size=4)
    path = sorted((gen_data / "weave" / "test" / "stain").iterdir())[0]
    grey = tmp_path / "grey.png"  # grey and not square
    Image.open(sorted((gen_data / "disc" / "test" / "scratch").iterdir())[0]).convert("L").crop((0, 8, 96, 68)).save(grey)
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    a, b, c, g = pred.predict([path, pil, arr, grey])
    assert a.source == str(path) and b.source == "<image 1>"
    for other in (b, c):
        assert other.score == pytest.approx(a.score, rel=1e-6) and other.category == a.category
        np.testing.assert_allclose(other.anomaly_map, a.anomaly_map, rtol=1e-5, atol=1e-6)
    assert a.anomaly_map.shape == arr.shape[:2] and a.mask.shape == arr.shape[:2]
    w, h = Image.open(grey).size
    assert g.anomaly_map.shape == (h, w)
    assert a.category == "weave"  # retrieved without being told
    for p in (a, g):
        assert p.normalized == pytest.approx(1 - 2 ** (-p.score / p.threshold), rel=1e-5)
        assert p.anomalous == (p.score > p.threshold) == (p.normalized > 0.5)
        assert p.mask.any() == (p.anomalous and bool((p.anomaly_map > p.threshold).any()))
    pic = overlay(pil, a.anomaly_map, a.threshold, a.mask)
    assert pic.shape == arr.shape and pic.dtype == np.uint8 and not np.array_equal(pic, arr)


def test_output_names_follow_one_rule_and_never_collide() -> None:
    assert _output_names([Path("x/good/000.png"), Path("x/good/006.png")]) == ["000", "006"]
    assert _output_names([Path("x/good/000.png"), Path("x/crack/000.png"), Path("x/good/006.png")]) == \
        ["good__000", "crack__000", "good__006"]
    assert _output_names([Path("/p/a/000.png"), Path("/q/a/000.png"), Path("/q/b/001.png")]) == \
        ["p__a__000", "q__a__000", "q__b__001"]
    # what whole paths cannot tell apart is numbered, never overwritten
    names = _output_names([Path("d/a.png"), Path("d/a.jpg"), Path("d/a-2.png"), Path("d/a.png")])
    assert names == ["a", "a-2", "a-2-2", "a-3"] and len(set(names)) == 4
    assert _output_names([]) == []


def test_retiring_a_run_deletes_only_its_listed_images(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for rel in ("overlays/a.png", "masks/a_mask.png", "overlays/b.png", "elsewhere.png", "overlays/notes.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    listed = [{"overlay": "overlays/a.png", "mask": "masks/a_mask.png"}, {"overlay": "overlays/../elsewhere.png"},
              {"overlay": "../out/overlays/notes.txt"}, {"overlay": None}, "not a row"]
    (out / "predictions.json").write_text(json.dumps({"predictions": listed}))
    (out / "predictions.csv").write_text("image\n")
    _retire_earlier_run(out)
    left = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert left == ["elsewhere.png", "overlays/b.png", "overlays/notes.txt"]
    (out / "predictions.json").write_text("{broken")  # an unreadable index is removed, nothing else
    _retire_earlier_run(out)
    assert not (out / "predictions.json").exists() and (out / "overlays" / "b.png").exists()


def test_predict_command(trained: Path, gen_data: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    src = sorted((gen_data / "disc" / "test" / "scratch").iterdir())[:2]
    for d in ("a", "b"):  # the same names in two folders: outputs must not overwrite each other
        for f in src:
            (folder / d / f.name).write_bytes(f.read_bytes())
    single = sorted((gen_data / "weave" / "test" / "good").iterdir())[0]
    pattern = str(gen_data / "weave" / "test" / "stain" / "00*.png")
    code = cli.main(["predict", str(trained), str(folder), str(single), pattern, "--output", str(tmp_path / "out"),
                     "--device", "cpu", "--no-progress"])
    assert code == 0
    n = 4 + 1 + len(expand_inputs([pattern]))
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert data["summary"]["images"] == n == len(data["predictions"])
    assert len(list((tmp_path / "out" / "overlays").iterdir())) == n == len(list((tmp_path / "out" / "masks").iterdir()))
    assert (tmp_path / "out" / "predictions.csv").read_text().count("\n") == n + 1
    row = data["predictions"][0]
    assert set(row) >= {"image", "anomalous", "normalized_score", "score", "category", "similarity", "overlay", "mask"}
    mask = np.asarray(Image.open(tmp_path / "out" / row["mask"]))
    assert mask.shape == np.asarray(Image.open(row["image"])).shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert f"{n} images" in capsys.readouterr().out
    # one naming rule for the whole run: the stems repeat (a/ and b/), so every image is named by its last two parts
    assert all(r["overlay"] == f"overlays/{Path(r['image']).parent.name}__{Path(r['image']).stem}.png"
               for r in data["predictions"])
    # A rerun into the same folder leaves only its own overlays and masks (here one image, then none at all with
    # --no-images); a file no run listed stays.
    overlays, masks = tmp_path / "out" / "overlays", tmp_path / "out" / "masks"
    (overlays / "mine.png").write_bytes(b"not onenip's")
    assert cli.main(["predict", str(trained), str(single), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(f.name for f in overlays.iterdir()) == sorted(["mine.png", f"{single.stem}.png"])
    assert [f.name for f in masks.iterdir()] == [f"{single.stem}_mask.png"]
    assert cli.main(["predict", str(trained), str(single), "--output", str(tmp_path / "out"), "--no-images",
                     "--no-progress"]) == 0
    assert [f.name for f in overlays.iterdir()] == ["mine.png"] and not any(masks.iterdir())
    assert cli.main(["predict", str(trained), str(folder), str(single), pattern, "--output", str(tmp_path / "out"),
                     "--no-progress"]) == 0
    capsys.readouterr()

    bad = folder / "a" / "zz_broken.png"
    bad.write_bytes(b"not an image")
    assert cli.main(["predict", str(trained), str(folder), "--output", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1 image cannot be read" in err and "zz_broken.png" in err and "--skip-bad" in err
    other = tmp_path / "elsewhere" / "empty.png"  # a second one, met later: one error names both
    other.parent.mkdir()
    other.write_bytes(b"")
    assert cli.main(["predict", str(trained), str(bad), str(single), str(other), "--output", str(tmp_path / "o2"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 images cannot be read" in err and "zz_broken.png" in err and "empty.png" in err
    # A rerun into the first folder that fails before writing anything leaves the first run's index alone; one that
    # fails after it has overwritten overlays removes it (an error in the second batch of two images here).
    index = tmp_path / "out" / "predictions.json"
    assert cli.main(["predict", str(trained), str(bad), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert json.loads(index.read_text())["summary"]["images"] == n
    assert cli.main(["predict", str(trained), str(folder), "--output", str(tmp_path / "out"), "--batch-size", "2",
                     "--no-progress"]) == 2
    assert "zz_broken.png" in capsys.readouterr().err
    assert not index.exists() and not (tmp_path / "out" / "predictions.csv").exists()
    with pytest.warns(UserWarning, match="left out 1"):
        assert cli.main(["predict", str(trained), str(folder), "--output", str(tmp_path / "o3"), "--skip-bad",
                         "--no-images", "--no-progress"]) == 0
    data = json.loads((tmp_path / "o3" / "predictions.json").read_text())
    assert data["summary"]["images"] == 4 and data["summary"]["skipped"][0]["image"] == str(bad)
    assert not (tmp_path / "o3" / "overlays").exists()
    assert cli.main(["predict", str(trained), str(tmp_path / "nothing*.png"), "--output", str(tmp_path / "o4")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_calibrate_command(trained: Path, gen_data: Path, tmp_path: Path, capsys) -> None:
    before = Detector.load(trained).deployment
    loose = tmp_path / "loose.safetensors"
    assert cli.main(["calibrate", str(trained), "--far", "0.3", "--output", str(loose)]) == 0
    after = Detector.load(loose).deployment
    for cat in before.categories:  # a higher false alarm rate never raises a threshold
        assert after.thresholds[cat] <= before.thresholds[cat]
        assert after.calibration[cat]["far"] == 0.3
    assert torch.equal(after.pool_feats, before.pool_feats) and after.fusion_scale == before.fusion_scale
    f1 = tmp_path / "f1.safetensors"
    assert cli.main(["calibrate", str(trained), "--val", str(gen_data), "--output", str(f1)]) == 2  # 4 categories
    assert "not among the model's" in capsys.readouterr().err
    val = tmp_path / "val"
    val.mkdir()
    for cat in ("disc", "weave"):
        (val / cat).symlink_to(gen_data / cat, target_is_directory=True)
    assert cli.main(["calibrate", str(trained), "--val", str(val), "--output", str(f1)]) == 0
    dep = Detector.load(f1).deployment
    assert all(dep.calibration[c]["method"] == "f1" and 0 < dep.calibration[c]["f1"] <= 1 for c in dep.categories)
    # a labelled folder in test layout alone (no train/) is a validation set too
    labelled = tmp_path / "labelled"
    for cat in ("disc", "weave"):
        (labelled / cat).mkdir(parents=True)
        for sub in ("test", "ground_truth"):
            (labelled / cat / sub).symlink_to(gen_data / cat / sub, target_is_directory=True)
    assert cli.main(["calibrate", str(trained), "--val", str(labelled), "--output", str(f1)]) == 0
    assert Detector.load(f1).deployment.thresholds == dep.thresholds
    # far = 0: no held-out image above the threshold (their maximum), no division by zero
    assert cli.main(["calibrate", str(trained), "--far", "0", "--output", str(f1)]) == 0
    zero = Detector.load(f1).deployment.calibration["disc"]
    assert zero["far"] == 0 and "note" not in zero


def test_run_folders_and_training_checkpoints(trained: Path, gen_data: Path, tmp_path: Path, capsys) -> None:
    """A run folder means its model for predict, test and calibrate; calibrate never rewrites the training
    checkpoint in place (that would drop what --resume continues from), and a model cannot be resumed."""
    run = trained.parent
    last = run / "checkpoints" / "last.safetensors"
    assert checkpoint_file(run, with_training_state=False) == trained and checkpoint_file(run) == last
    assert load_checkpoint(last).optimizer is not None and load_checkpoint(trained).optimizer is None
    image = sorted((gen_data / "disc" / "test" / "good").iterdir())[0]
    assert cli.main(["predict", str(run), str(image), "--output", str(tmp_path / "p"), "--no-progress"]) == 0
    size = last.stat().st_size
    assert cli.main(["calibrate", str(last), "--far", "0.3"]) == 2
    assert "training checkpoint" in capsys.readouterr().err and last.stat().st_size == size
    assert cli.main(["calibrate", str(tmp_path), "--far", "0.3"]) == 2  # a folder with no model
    assert "is a folder without model.safetensors" in capsys.readouterr().err
    assert cli.main(["calibrate", str(trained), "--far", "0.3", "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="holds no training state"):
        Trainer(Detector.load(trained).cfg, resume=trained, progress=False)
    # outputs that are files, not folders, are named errors
    afile = tmp_path / "a.png"
    afile.write_bytes(b"x")
    assert cli.main(["predict", str(trained), str(image), "--output", str(afile), "--no-progress"]) == 2
    assert cli.main(["test", str(trained), "--output", str(afile / "sub"), "--no-progress"]) == 2
    assert cli.main(["calibrate", str(trained), "--output", str(afile / "m.safetensors")]) == 2
    assert capsys.readouterr().err.count("is a file, not a folder") == 3
    # no output may replace a training checkpoint, nor (exports, reports) a model
    assert cli.main(["calibrate", str(trained), "--far", "0.3", "--output", str(last)]) == 2
    assert cli.main(["export", str(trained), "--format", "torchscript", "--output", str(trained)]) == 2
    assert cli.main(["export", str(trained), "--format", "torchscript", "--output", str(last)]) == 2
    err = capsys.readouterr().err
    assert err.count("is a training checkpoint") == 2 and "is an onenip model" in err
    assert last.stat().st_size == size and load_checkpoint(last).optimizer is not None and Detector.load(trained).deployment


def test_predict_never_reads_its_own_outputs(trained: Path, gen_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    image = sorted((gen_data / "disc" / "test" / "good").iterdir())[0]
    (folder / image.name).write_bytes(image.read_bytes())
    for _ in range(2):  # the second run finds the first run's overlays and masks inside its input folder
        rows = run_predict(trained, [str(folder), str(folder / image.name)], folder / "out", progress=False)
        assert [Path(r["image"]).name for r in rows] == [image.name]  # and an image given twice is judged once
    with pytest.raises(DatasetError, match="overlays/ or masks/"):
        run_predict(trained, [str(folder / "out" / "overlays")], folder / "out", progress=False)
    # nor another predict folder's inside the inputs
    rows = run_predict(trained, [str(folder)], folder / "out" / "nested", progress=False)
    assert [Path(r["image"]).name for r in rows] == [image.name]


def test_predictor_takes_arrays_of_any_numeric_type(trained: Path, gen_data: Path) -> None:
    predictor = Predictor.load(trained, device="cpu")
    rgb = np.asarray(Image.open(sorted((gen_data / "disc" / "test" / "good").iterdir())[0]).convert("RGB"))
    want = predictor.predict(rgb)[0].score
    for arr in (rgb.astype(np.float32) / 255, rgb.astype(np.float64), rgb.astype(np.uint16) * 257,
                rgb.astype(np.int64), np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])):
        assert predictor.predict(arr)[0].score == pytest.approx(want, rel=1e-5), arr.dtype
    grey = rgb[..., 0]
    assert predictor.predict(grey[..., None])[0].score == pytest.approx(predictor.predict(grey)[0].score)
    with pytest.raises(ValueError, match="not empty"):
        predictor.predict(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(TypeError, match="cannot read an image from bytes"):
        predictor.predict(b"\x89PNG")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        Predictor.load(trained, device="cpu", batch_size=0)
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N"):
        Predictor.load(trained, device="gpu")


def test_a_prediction_prints_as_a_summary_not_its_arrays() -> None:
    amap = np.zeros((300, 200), np.float32)
    mask = np.zeros((300, 200), bool)
    mask[10:20, 10:15] = True
    p = Prediction(source="a.png", score=0.25, normalized=0.7, anomalous=True, category="bottle", similarity=0.93,
                   threshold=0.125, anomaly_map=amap, mask=mask)
    text = repr(p)
    assert text.startswith("Prediction(source='a.png', decision='defective', normalized=0.7000")
    assert "category='bottle'" in text and "anomaly_map=<300x200>" in text and "mask=<50 defect pixels>" in text
    assert len(text) < 300


def test_the_deployed_model_retrieves_by_type_mean_when_configured(tiny_model: Path, gen_batch: np.ndarray) -> None:
    """A pool where one type holds an exact copy of the query among far entries, and the other only near copies:
    nearest retrieval takes the first type, eval.retrieval type_mean the second (and its closest entry)."""
    import dataclasses

    det = Detector.load(tiny_model)
    dep = det.deployment
    images = torch.from_numpy(gen_batch[:1])
    with torch.no_grad():
        q = det.features(images)[0]  # (C, H, W)
    gen = torch.Generator().manual_seed(0)
    far = [torch.randn(q.shape, generator=gen) * q.abs().mean() for _ in range(3)]
    near = [q + 0.05 * q.abs().mean() * torch.randn(q.shape, generator=gen) for _ in range(4)]
    first, second = dep.categories[0], dep.categories[1]
    crafted = dataclasses.replace(dep, pool_feats=torch.stack([q, *far, *near]),
                                  pool_categories=[first] * 4 + [second] * 4, pool_images=[f"/p/{i}.png" for i in range(8)])
    got = {}
    for rule in ("nearest", "type_mean"):
        det.cfg.eval.retrieval = rule
        with torch.no_grad():
            got[rule] = DeployModel(det, crafted)(images)
    assert dep.categories[int(got["nearest"]["category"])] == first
    assert float(got["nearest"]["similarity"]) == pytest.approx(1.0, abs=1e-5)  # the exact copy
    assert dep.categories[int(got["type_mean"]["category"])] == second
    pool = torch.stack(near).mean(dim=(2, 3))
    closest = int(torch.nn.functional.cosine_similarity(pool, q.mean(dim=(1, 2))[None], dim=1).argmax())
    assert float(got["type_mean"]["similarity"]) == pytest.approx(  # the closest of the near copies
        float(torch.nn.functional.cosine_similarity(pool[closest], q.mean(dim=(1, 2)), dim=0)), abs=1e-5)
    assert float(got["type_mean"]["similarity"]) < 1.0


def test_a_test_run_with_another_retrieval_rule_reports_no_decisions(tiny_model: Path) -> None:
    """`onenip test --set eval.retrieval=type_mean` on a model deployed with the nearest rule measures another model
    than predict runs: its metrics come, its decisions do not (with the reason); with the model's own rule they do."""
    from onenip.evaluation.evaluate import evaluate

    det = Detector.load(tiny_model)
    cfg = make_config(det.cfg, ["eval.retrieval=type_mean"])
    res = evaluate(det, cfg, progress=False)
    assert res.decisions is None and "eval.retrieval=type_mean" in (res.decisions_note or "")
    assert evaluate(det, make_config(det.cfg, []), progress=False).decisions is not None
