"""A product type added to a trained model from K normal images, with no training: it joins the prompt pool, is scored
by the training-free prompt map, gets a threshold and an unknown-type limit, and predict, test and export treat it as
a trained type. Bad input is named. Each test fails without the behaviour it names."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import onenip
from onenip import cli
from onenip.api import add_type
from onenip.data import read_sources
from onenip.data.images import load_batch
from onenip.deploy.predictor import Predictor
from onenip.errors import ConfigError, DatasetError
from onenip.models.detector import Detector
from onenip.models.scoring import added_type_bank


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    return tiny_model


def grain(gen_data: Path, split: str, label: int | None = None) -> list[Path]:
    return [s.image for s in read_sources([str(gen_data)], split, ["grain"]) if label is None or s.label == label]


@pytest.mark.parametrize("k", [1, 4])
def test_added_type_is_retrieved_scored_and_judged(model: Path, gen_data: Path, tmp_path: Path, k: int) -> None:
    out = tmp_path / "with_grain.safetensors"
    before = Detector.load(model).deployment
    path, dep = add_type(model, "grain", grain(gen_data, "train")[:k], output=out)
    assert path == out and Detector.load(model).deployment.categories == before.categories  # the original is untouched
    assert dep.categories == ["disc", "grain", "weave"] and dep.added_types == ["grain"]
    assert dep.pool_categories.count("grain") == k and math.isfinite(dep.thresholds["grain"])
    assert math.isfinite(dep.type_thresholds["grain"]) and dep.calibration["grain"]["type_images"] == (4 if k == 1 else k)
    assert "grain" not in dep.colour_models and dep.calibration["grain"]["colour_check"].startswith(f"off: {k} normal")
    assert dep.thresholds["disc"] == before.thresholds["disc"]  # trained types keep their thresholds
    preds = Predictor.load(out, device="cpu").predict(grain(gen_data, "test"))
    assert sum(p.category == "grain" for p in preds) >= 0.9 * len(preds)  # retrieval finds the new type
    labels = [s.label for s in read_sources([str(gen_data)], "test", ["grain"])]
    flagged_bad = sum(p.anomalous for p, y in zip(preds, labels) if y == 1)
    flagged_good = sum(p.anomalous for p, y in zip(preds, labels) if y == 0)
    assert flagged_bad >= flagged_good  # the prompt map finds the defects better than chance here
    # test measures it with the same map (its decisions are predict's)
    res = onenip.test(out, overrides=[f"data.roots=[{gen_data}]", "data.categories=[grain]"], output=tmp_path / "res",
                      progress=False)
    rows = {r["image"]: r for r in res.scores}
    assert [rows[str(p.source)]["anomalous"] for p in preds] == [p.anomalous for p in preds]


def test_test_evaluates_an_added_type_without_being_told(model: Path, gen_data: Path, tmp_path: Path) -> None:
    """An added type is the model's: `onenip test` on roots that hold it evaluates it (it used to be left out as a
    category the model was not trained on, unless data.categories named it); types it has neither trained nor added
    are still left out, with the warning naming them."""
    out = tmp_path / "with_grain.safetensors"
    add_type(model, "grain", grain(gen_data, "train")[:2], output=out)
    with pytest.warns(UserWarning, match=r"test categories bracket are not among the model's \(disc, grain, weave\)"):
        res = onenip.test(out, overrides=[f"data.roots=[{gen_data}]", "data.categories=[]"], output=tmp_path / "res",
                          progress=False)
    assert sorted(res.categories) == ["disc", "grain", "weave"]


def test_further_normal_images_set_the_threshold(model: Path, gen_data: Path, tmp_path: Path) -> None:
    _, dep = add_type(model, "grain", grain(gen_data, "train")[:2], normal=grain(gen_data, "train")[2:12],
                      output=tmp_path / "m.safetensors")
    assert dep.calibration["grain"]["normal_images"] == 10 and "10 further normal images" in dep.calibration["grain"]["source"]
    # the scores the threshold rests on are those the deployed model gives these images as the added type
    preds = Predictor(Detector.load(tmp_path / "m.safetensors"), device="cpu", product_type="grain").predict(
        grain(gen_data, "train")[2:12])
    assert dep.calibration["grain"]["normal_scores"] == pytest.approx(sorted(p.score for p in preds), rel=1e-4, abs=1e-6)
    assert dep.type_thresholds["grain"] == pytest.approx(1.2 * max(p.type_distance for p in preds), rel=1e-4)
    # its colour model: from the 2 prompts and the 10 further images together (12 >= COLOUR_MIN_IMAGES), saved with it
    assert dep.calibration["grain"]["colour_images"] == 12
    assert Detector.load(tmp_path / "m.safetensors").deployment.colour_models["grain"] == dep.colour_models["grain"]
    assert all(p.colour_distance <= dep.colour_models["grain"]["limit"] for p in preds)  # its own images pass


def test_without_further_images_each_fold_is_scored_against_the_others(model: Path, gen_data: Path,
                                                                       tmp_path: Path, monkeypatch) -> None:
    """K = 5 prompt images: four folds ({0, 4}, {1}, {2}, {3}), each scored against the bank of the other images, so
    image 0's threshold score is what a type added from images 1-3 alone gives it (and image 3's, from 0, 1, 2, 4).
    Banks of every patch here: a coreset could pick other patches after a last-digit difference between two batches."""
    import onenip.models.scoring as scoring

    monkeypatch.setattr(scoring, "BANK_SHARE", 1.0)
    monkeypatch.setattr(scoring, "BANK_MAX_IMAGES", 64)
    train = grain(gen_data, "train")
    _, dep = add_type(model, "grain", train[:5], output=tmp_path / "m.safetensors")
    assert dep.calibration["grain"]["source"] == "the 5 prompt images in 4 folds, each against the other folds"
    for image, rest in ((0, train[1:4]), (3, [train[i] for i in (0, 1, 2, 4)])):
        _, alone = add_type(model, "g", rest, output=tmp_path / f"alone{image}.safetensors")
        pred = Predictor(Detector.load(tmp_path / f"alone{image}.safetensors"), device="cpu",
                         product_type="g").predict([train[image]])[0]
        assert min(abs(s - pred.score) for s in dep.calibration["grain"]["normal_scores"]) <= 1e-4 * abs(pred.score)


def test_bad_input_is_named(model: Path, gen_data: Path, tmp_path: Path) -> None:
    images = grain(gen_data, "train")[:2]
    with pytest.raises(ConfigError, match="at least one normal image"):
        add_type(model, "grain", [], output=tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match="'disc': the model has this product type already"):
        add_type(model, "disc", images, output=tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\), got 1.5"):  # not a traceback, nor a wrong threshold
        add_type(model, "grain", images, far=1.5, output=tmp_path / "f.safetensors")
    with pytest.raises(ConfigError, match="give the new product type a name"):
        add_type(model, "  ", images, output=tmp_path / "c.safetensors")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(DatasetError, match="notes.png"):
        add_type(model, "grain", [*images, not_image], output=tmp_path / "d.safetensors")
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.new("RGB", (3, 2)).save(tiny)  # any size is resized to the model's, as predict does: accepted
    add_type(model, "grain", [tiny], output=tmp_path / "e.safetensors")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_add_type_command_writes_the_model_in_place(model: Path, gen_data: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "model.safetensors"
    shutil.copy(model, copy)
    folder = tmp_path / "grain_images"
    folder.mkdir()
    for p in grain(gen_data, "train")[:3]:
        shutil.copy(p, folder / p.name)
    assert cli.main(["add-type", str(copy), str(folder), "--name", "grain"]) == 0
    assert "added 'grain' from 3 images (a bank of 64 of their patches)" in capsys.readouterr().out  # of 3 x 8 x 8
    assert Detector.load(copy).deployment.added_types == ["grain"]
    assert cli.main(["add-type", str(copy), str(folder), "--name", "grain"]) == 2  # now a known name: a clear error
    assert "the model has this product type already" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "openvino"])
def test_export_carries_an_added_type(model: Path, gen_data: Path, tmp_path: Path, fmt: str) -> None:
    """Each export computes the added type's prompt map (patches, per-tap distances, smoothing) as PyTorch does."""
    import importlib.util

    from onenip.data.images import load_batch
    from onenip.deploy.export import export_model
    from onenip.deploy.runtimes import open_runtime
    from onenip.models.inference import DeployModel

    needs = {"onnx": "onnxruntime", "openvino": "openvino"}.get(fmt)
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    out = tmp_path / "m.safetensors"
    add_type(model, "grain", grain(gen_data, "train")[:3], output=out)
    suffix = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "openvino": ".xml"}[fmt]
    runtime = open_runtime(export_model(out, fmt, tmp_path / f"m{suffix}"), threads=1)
    assert "grain" in runtime.categories
    images = load_batch(grain(gen_data, "test")[:4], 64)
    det = Detector.load(out)
    with torch.no_grad():
        want = DeployModel(det, det.deployment)(torch.from_numpy(images))
    got = runtime.run(images)
    grain_index = det.deployment.categories.index("grain")
    assert (want["category"] == grain_index).all()  # the added type's map is what is compared
    assert np.abs(got["map"] - want["map"].numpy()).max() <= 1e-4
    np.testing.assert_allclose(got["score"], want["score"].numpy(), rtol=1e-4)


def test_replace_swaps_an_added_types_prompts_and_refuses_trained_or_unknown_names(model: Path, gen_data: Path,
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    _, first = add_type(model, "grain", grain(gen_data, "train")[:2], output=out)
    _, second = add_type(out, "grain", grain(gen_data, "train")[2:5], replace=True)  # in place
    assert second.added_types == ["grain"] and second.pool_categories.count("grain") == 3
    assert [p for p, c in zip(second.pool_images, second.pool_categories) if c == "grain"] == \
        [str(p) for p in grain(gen_data, "train")[2:5]]
    assert list(second.prompt_patches) == ["grain"] and len(second.prompt_patches["grain"]) == 64  # of 3 x 8 x 8
    assert second.calibration["grain"]["added_from"] == [str(p) for p in grain(gen_data, "train")[2:5]]
    assert second.thresholds["disc"] == first.thresholds["disc"]  # the rest untouched
    assert len(second.pool_feats) == len(first.pool_feats) + 1
    with pytest.raises(ConfigError, match="'disc': a trained type, which cannot be replaced"):
        add_type(out, "disc", grain(gen_data, "train")[:2], replace=True)
    with pytest.raises(ConfigError, match="'gravel': not a type of the model"):
        add_type(out, "gravel", grain(gen_data, "train")[:2], replace=True)


def test_a_type_added_without_its_patches_is_refused_with_the_fix(model: Path, gen_data: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """A model whose added type has no stored prompt patches (as an earlier version wrote it) is not scored by some
    other map: building the deployed model names that type (not the others) and the command that re-adds it, with its
    images, and that command works; a type added later and a replaced one each keep their own patches (banks of
    every patch here, comparable across batches)."""
    import dataclasses

    import onenip.models.scoring as scoring
    from onenip.models.inference import DeployModel

    monkeypatch.setattr(scoring, "BANK_SHARE", 1.0)

    out = tmp_path / "m.safetensors"
    train = grain(gen_data, "train")
    add_type(model, "grain", train[:2], output=out)
    det = Detector.load(out)
    det.deployment = dataclasses.replace(det.deployment, prompt_patches={})  # as an earlier version wrote it
    det.save(out)
    _, dep = add_type(out, "gravel", train[2:5])  # a second type, added by this version
    assert list(dep.prompt_patches) == ["gravel"]
    fix = "onenip add-type MODEL --replace --name grain " + " ".join(str(p) for p in train[:2])
    with pytest.raises(ConfigError, match=r"product types \['grain'\] were added by an earlier version") as err:
        DeployModel(Detector.load(out), Detector.load(out).deployment)
    assert fix in str(err.value)
    _, dep = add_type(out, "grain", train[5:9], replace=True)
    assert dep.added_types == ["gravel", "grain"] and sorted(dep.prompt_patches) == ["grain", "gravel"]
    det = Detector.load(out)
    fresh = det.features_and_patches(torch.from_numpy(load_batch(train[2:5] + train[5:9], 64)))[1]
    banks = det.deployment.prompt_patches  # each type the bank of its own images
    assert torch.allclose(banks["gravel"], added_type_bank(fresh[:3]), atol=1e-5)
    assert torch.allclose(banks["grain"], added_type_bank(fresh[3:]), atol=1e-5)
    Predictor.load(out, device="cpu").predict(grain(gen_data, "test")[:2])  # scores again


def test_patches_stored_before_banks_were_coresets_load_as_a_full_bank(model: Path, gen_data: Path,
                                                                       tmp_path: Path) -> None:
    """A model written when an added type's patches were stored whole, (K, C', G, G), loads with every one of them in
    its bank (the bank its threshold was set on), and predicts with it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "m.safetensors"
    train = grain(gen_data, "train")
    add_type(model, "grain", train[:4], output=out)
    whole = Detector.load(out).features_and_patches(torch.from_numpy(load_batch(train[:4], 64)))[1]  # (4, C', 8, 8)
    with safe_open(str(out), "pt") as f:  # the file as the earlier onenip wrote it: whole patches, layout 1
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["onenip"])
    save_file({**tensors, "deploy.prompt_patches.0": whole.contiguous()}, str(out),
              metadata={"onenip": json.dumps({**meta, "version": 1})})
    loaded = Detector.load(out).deployment.prompt_patches["grain"]
    assert loaded.shape == (4 * 8 * 8, whole.shape[1])
    assert torch.equal(loaded, whole.flatten(2).transpose(1, 2).reshape(-1, whole.shape[1]))
    assert len(Predictor.load(out, device="cpu").predict(grain(gen_data, "test")[:2])) == 2


def test_a_model_with_a_bank_says_so_in_its_layout_version(model: Path, gen_data: Path, tmp_path: Path) -> None:
    """Layout 2 (a bank of rows) only where an added type has one, so that an older onenip refuses such a file by its
    version instead of failing inside; a version newer than this onenip's is refused by name."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from onenip.errors import CheckpointError

    def meta(path: Path) -> dict:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["onenip"])

    out = tmp_path / "m.safetensors"
    add_type(model, "grain", grain(gen_data, "train")[:2], output=out)
    assert meta(model)["version"] == 1 and meta(out)["version"] == 2
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"onenip": json.dumps({**meta(out), "version": 4})})
    with pytest.raises(CheckpointError, match="checkpoint version 4 is newer than this onenip"):
        Detector.load(newer)


def test_calibrate_keeps_an_added_type(model: Path, gen_data: Path, tmp_path: Path) -> None:
    """Recalibrating a model with an added type keeps it added, with its patches (it used to drop both, so the type
    was then scored by the learned map it was never trained for)."""
    from onenip.api import calibrate

    out = tmp_path / "m.safetensors"
    add_type(model, "grain", grain(gen_data, "train")[:2], output=out)
    _, after, before = calibrate(out, far=0.3, output=tmp_path / "c.safetensors")
    assert after.added_types == before.added_types == ["grain"]
    assert list(after.prompt_patches) == ["grain"]
    assert torch.equal(after.prompt_patches["grain"], before.prompt_patches["grain"])
    assert after.thresholds["grain"] == before.thresholds["grain"]  # no held-out images of it: kept
