"""Training on generated images (CPU): items, the loss going down, checkpoints, resume, and clear failures."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GEN_TRAIN, training_child

from onenip.api import fit, make_config
from onenip.checkpoint import load_checkpoint, save_checkpoint
from onenip.config import Config, load_config
from onenip.data import read_sources
from onenip.errors import CheckpointError, OnenipError
from onenip.models.detector import Detector
from onenip.synthesis.per_image import FolderTextures
from onenip.training.trainer import Trainer, TrainingError, lr_at
from onenip.training.trainset import EpochSampler, TrainSet

CATS = "[bracket, grain]"  # two generated categories of GEN_TRAIN training images each


def tiny(tmp_path: Path, gen_data: Path, gen_textures: Path, *extra: str) -> Config:
    """A small but complete OneNIP (4+4 layers at width 64) on two generated categories at 64 px."""
    return make_config(None, [
        f"data.roots=[{gen_data}]", f"data.categories={CATS}", "data.input_size=64", f"data.textures={gen_textures}",
        "data.workers=0", "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
        "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "model.refiner_channels=32",
        "train.batch_size=8", "train.epochs=2", "train.device=cpu", "train.lr=5e-4",
        f"output_dir={tmp_path / 'run'}", *extra,
    ])


# -- items ------------------------------------------------------------------------------------------------------------


def test_items_are_reproducible_and_prompts_share_the_category(gen_data: Path, gen_textures: Path) -> None:
    samples = read_sources([str(gen_data)], "train", ["bracket", "grain"])
    cfg = make_config(None, []).synthesis
    ds = TrainSet(samples, 64, cfg, str(gen_textures), prompt="dynamic", seed=5, threads=2)
    smooth = TrainSet(samples, 64, dataclasses.replace(cfg, texture_resize="antialias"), str(gen_textures), cache=False)
    assert isinstance(ds.textures, FolderTextures) and (ds.textures.resize, smooth.textures.resize) == ("opencv", "antialias")
    a, b, c = ds[(3, 10)], ds[(3, 10)], ds[(4, 10)]
    for k in ("image", "synthetic", "mask", "prompt"):
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["synthetic"], c["synthetic"])  # another epoch, another pseudo-anomaly
    assert a["image"].shape == (3, 64, 64) and a["image"].dtype == torch.uint8
    assert a["mask"].shape == (1, 64, 64) and set(a["mask"].unique().tolist()) <= {0, 1}
    for i in range(len(ds)):
        item = ds[(0, i)]
        assert samples[item["prompt_index"]].category == samples[i].category
    # outside the mask the synthetic image is the query itself
    m = a["mask"].bool().expand(3, -1, -1)
    assert torch.equal(a["synthetic"][~m], a["image"][~m])

    static = TrainSet(samples, 64, cfg, None, prompt="static", seed=5, threads=2)
    prompts = {(samples[i].category, static[(e, i)]["prompt_index"]) for e in range(2) for i in range(0, len(ds), 7)}
    assert len(prompts) == 2  # one fixed prompt per category

    lean = TrainSet(samples, 64, cfg, None, seed=5, threads=2, return_normals=False)
    assert "image" not in lean[(0, 0)] and "prompt" not in lean[(0, 0)] and "synthetic" in lean[(0, 0)]


def test_sampler_permutes_per_epoch_and_shards() -> None:
    s = EpochSampler(10, seed=1)
    s.set_epoch(0)
    e0 = [i for _, i in s]
    s.set_epoch(1)
    e1 = [i for _, i in s]
    assert sorted(e0) == list(range(10)) and e0 != e1
    shards = [list(EpochSampler(10, 1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(x) == 4 for x in shards)
    assert {i for sh in shards for _, i in sh} == set(range(10))


def test_lr_step_decay() -> None:
    # the reference (§5): 1000 epochs, epochs 0..800 at 1e-4 (801 epochs), 801..999 at 1e-5
    cfg = make_config(None, ["train.epochs=1000"])
    lrs = [lr_at(cfg, e) for e in range(1000)]
    assert sum(lr == pytest.approx(1e-4) for lr in lrs) == 801 and lrs[800] == pytest.approx(1e-4)
    assert all(lr == pytest.approx(1e-5) for lr in lrs[801:])
    cfg = make_config(None, ["train.epochs=10"])
    assert [lr_at(cfg, e) for e in (0, 8, 9)] == pytest.approx([1e-4, 1e-4, 1e-5])
    cfg = make_config(None, ["train.epochs=10", "train.lr_decay_epoch=3"])
    assert lr_at(cfg, 3) == pytest.approx(1e-4) and lr_at(cfg, 4) == pytest.approx(1e-5)


# -- learning ---------------------------------------------------------------------------------------------------------


def _fixed_batch_loss(trainer: Trainer) -> float:
    trainer.net.eval()  # no dropout or jitter: the same batch gives the same loss
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    with torch.no_grad():
        return trainer.losses(batch)["loss"].item()


@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_few_steps_lower_the_loss(tmp_path: Path, gen_data: Path, gen_textures: Path, cache: str) -> None:
    cfg = tiny(tmp_path, gen_data, gen_textures, "train.max_steps=40", "train.epochs=100", "train.lr=2e-3",
               f"train.cache_features={cache}")
    trainer = Trainer(cfg, progress=False)
    before = _fixed_batch_loss(trainer)
    result = trainer.run()
    after = _fixed_batch_loss(trainer)
    assert result.steps == 40
    assert after < 0.8 * before, (before, after)
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,lr") and len(log) == 1 + result.epochs
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert load_config([tmp_path / "run" / "config.json"]) == cfg  # the run folder's JSON config reloads


def test_cached_and_plain_features_give_the_same_losses(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    plain = Trainer(tiny(tmp_path / "a", gen_data, gen_textures, "train.cache_features=false"), progress=False)
    cached = Trainer(tiny(tmp_path / "b", gen_data, gen_textures, "train.cache_features=true"), progress=False)
    cached.net.load_state_dict(plain.net.state_dict())
    a, b = _fixed_batch_loss(plain), _fixed_batch_loss(cached)
    assert a == pytest.approx(b, rel=1e-5)


def test_uniad_and_ablation_switches_train(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    for i, extra in enumerate([
        ("model.arch=uniad", "train.prompt=none", "model.refiner=false", "train.restoration=false"),
        ("model.arch=uniad", "train.prompt=none", "model.refiner=false"),  # restoration without prompt
        ("model.arch=static-prompt", "model.refiner=false", "train.restoration=false"),  # Table 4a line 1
        ("train.prompt=static", "model.refiner=false", "train.restoration=false"),  # one fixed prompt (Table 4d)
        ("train.restoration=false",),  # refiner trained on synthetic images without the restoration MSE
    ]):
        cfg = tiny(tmp_path / str(i), gen_data, gen_textures, "train.max_steps=2", *extra)
        trainer = Trainer(cfg, progress=False)
        assert trainer.synthesize == (cfg.train.restoration or cfg.model.refiner)
        res = trainer.run()
        assert res.steps == 2 and np.isfinite(res.history[-1]["loss"])


# -- checkpoints and resume ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    cfg = tiny(tmp_path, gen_data, gen_textures, "train.max_steps=3")
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert state.config == cfg and state.step == 3 and state.optimizer is not None
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(state.net[k], v.cpu()), k
    det = Detector.load(tmp_path / "run" / "model.safetensors")
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    trainer.detector.eval()
    det.eval()
    a, b = trainer.detector.features(x), det.features(x)
    assert torch.equal(a, b)
    assert torch.equal(trainer.detector.maps(a, a).rec, det.maps(b, b).rec)
    # a second save over the first leaves one complete file and no temporary ones
    save_checkpoint(tmp_path / "run" / "model.safetensors", state)
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


def test_resume_gives_the_same_weights(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    straight = Trainer(tiny(tmp_path / "a", gen_data, gen_textures, "train.save_every=1"), progress=False)
    straight.run()
    steps_per_epoch = len(straight.loader)
    first = Trainer(tiny(tmp_path / "b", gen_data, gen_textures, f"train.max_steps={steps_per_epoch}"), progress=False)
    first.run()  # stops after epoch 1 of 2, as if killed there
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "last.safetensors"
    assert load_checkpoint(ckpt).epoch == 1
    resumed = Trainer(tiny(tmp_path / "b", gen_data, gen_textures), resume=ckpt, progress=False)
    resumed.run()
    assert resumed.epoch == 2 and resumed.step == straight.step
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(resumed.history) == 2


def test_existing_run_is_not_overwritten(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    cfg = tiny(tmp_path, gen_data, gen_textures, "train.max_steps=1")
    Trainer(cfg, progress=False).run()
    with pytest.raises(TrainingError, match="already holds a training run"):
        Trainer(cfg, progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # a finished run whose checkpoints were deleted
    with pytest.raises(TrainingError, match="already holds a trained model"):
        Trainer(cfg, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OnenipError, match="is a file, not a folder"):
        Trainer(tiny(tmp_path, gen_data, gen_textures, f"output_dir={tmp_path / 'file'}"), progress=False)


def test_a_moved_run_resumes_where_it_is_and_works_from_anywhere(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative data.roots and data.textures are saved absolute; --resume goes on in the checkpoint's own run
    folder, not in the (copied) configuration's output_dir."""
    monkeypatch.chdir(gen_data.parent)
    here = Path.cwd()  # as the OS names the working folder (links resolved): relative paths are made absolute from it
    textures = os.path.relpath(gen_textures)
    cfg = tiny(tmp_path, gen_data, gen_textures, f"data.roots=[{gen_data.name}]", "train.max_steps=1",
               f"data.textures={textures}")
    Trainer(cfg, progress=False).run()
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run", moved)
    monkeypatch.chdir(tmp_path)
    result = fit(overrides=["train.max_steps=2"], resume=moved / "checkpoints" / "last.safetensors", progress=False)
    assert result.run_dir == moved and result.steps == 2 and not (tmp_path / "run").exists()
    saved = json.loads((moved / "config.json").read_text())
    assert saved["data"]["roots"] == [str(here / gen_data.name)] and saved["data"]["textures"] == str(here / textures)


def test_resume_rejects_another_architecture(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    cfg = tiny(tmp_path, gen_data, gen_textures, "train.max_steps=1")
    Trainer(cfg, progress=False).run()
    other = tiny(tmp_path / "x", gen_data, gen_textures, "model.hidden_dim=32")
    with pytest.raises(CheckpointError, match="model.hidden_dim"):
        Trainer(other, resume=tmp_path / "run" / "checkpoints" / "last.safetensors", progress=False)


def test_corrupted_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an onenip checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_truncated_checkpoint_is_refused(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    cfg = tiny(tmp_path, gen_data, gen_textures, "train.max_steps=1")
    Trainer(cfg, progress=False).run()
    good = (tmp_path / "run" / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        Detector.load(cut)


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path, gen_data: Path, gen_textures: Path, monkeypatch) -> None:
    cfg = tiny(tmp_path, gen_data, gen_textures, "train.max_steps=3")
    trainer = Trainer(cfg, progress=False)
    real = trainer.losses

    def poisoned(batch):
        out = real(batch)
        if trainer.step == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer, "losses", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 2"):
        trainer.run()


def test_loss_targets_are_the_clean_features_and_the_synthetic_masks(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                                      monkeypatch) -> None:
    """Reconstruction and restoration both aim at the clean query features (§2.2 step 2); the refiner's targets are an
    empty mask for the normal half and the synthesized mask for the synthetic half."""
    import onenip.training.trainer as train_module

    trainer = Trainer(tiny(tmp_path, gen_data, gen_textures), progress=False)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    clean, synthetic, prompt = trainer.batch_features(batch)
    assert not torch.equal(clean, synthetic)
    seen = {}

    def perfect(query, prompt_feats):
        seen["query"] = query
        return clean.repeat(2, 1, 1, 1)

    def capture(logits, masks, standard=False):
        seen["masks"] = masks
        return logits.sum() * 0

    monkeypatch.setattr(trainer.net, "reconstruct", perfect)
    monkeypatch.setattr(train_module, "dice_loss", capture)
    terms = trainer.losses(batch)
    assert terms["mse"].item() == 0.0
    assert torch.equal(seen["query"], torch.cat([clean, synthetic]))
    b = clean.shape[0]
    assert seen["masks"].shape == (2 * b, 1, 64, 64)
    assert seen["masks"][:b].sum() == 0 and torch.equal(seen["masks"][b:], batch["mask"])


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    """A training process killed with SIGKILL in the middle of an epoch loses nothing but that epoch: its checkpoint
    is complete, and resuming from it ends with exactly the weights of an uninterrupted run with the same seed."""
    import signal

    overrides = [f"data.roots=[{gen_data}]", f"data.categories={CATS}", "data.input_size=64", f"data.textures={gen_textures}",
                 "data.workers=0", "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
                 "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "model.refiner_channels=32",
                 "train.batch_size=8", "train.epochs=3", "train.device=cpu", "train.save_every=1", "train.lr=5e-4"]
    straight = Trainer(make_config(None, overrides + [f"output_dir={tmp_path / 'a'}"]), progress=False)
    straight.run()
    per_epoch = len(straight.loader)

    run_b = tmp_path / "b"
    child, _ = training_child(tmp_path, [*overrides, f"output_dir={run_b}"], until_step=per_epoch + 2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    ckpt = run_b / "checkpoints" / "last.safetensors"
    state = load_checkpoint(ckpt)  # complete and readable, from the end of the last finished epoch
    assert state.epoch in (1, 2) and state.step == state.epoch * per_epoch
    assert not [p for p in ckpt.parent.iterdir() if p.name != ckpt.name], "a partial checkpoint was left behind"

    resumed = Trainer(make_config(None, overrides + [f"output_dir={run_b}"]), resume=ckpt, progress=False)
    resumed.run()
    assert resumed.step == straight.step == 3 * per_epoch
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k


def test_same_seed_gives_bit_identical_metrics(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    from onenip.evaluation.evaluate import evaluate

    out = []
    for run in ("a", "b"):
        cfg = tiny(tmp_path / run, gen_data, gen_textures, "train.max_steps=4", "data.categories=[grain]")
        trainer = Trainer(cfg, progress=False)
        trainer.run()
        out.append(evaluate(trainer.detector, cfg, progress=False))
    assert out[0].categories == out[1].categories  # exact equality of every float
    assert [r["score_fused"] for r in out[0].scores] == [r["score_fused"] for r in out[1].scores]
    cfg = tiny(tmp_path / "c", gen_data, gen_textures, "train.max_steps=4", "data.categories=[grain]", "train.seed=7")
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    assert evaluate(trainer.detector, cfg, progress=False).categories != out[0].categories  # the seed matters


def test_nan_keeps_the_last_good_checkpoint(tmp_path: Path, gen_data: Path, gen_textures: Path, monkeypatch) -> None:
    cfg = tiny(tmp_path, gen_data, gen_textures, "train.save_every=1", "train.epochs=3")
    trainer = Trainer(cfg, progress=False)
    per_epoch = len(trainer.loader)
    real = trainer.losses

    def poisoned(batch):
        out = real(batch)
        if trainer.step == per_epoch + 1:  # in epoch 2
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(trainer, "losses", poisoned)
    with pytest.raises(TrainingError, match=r"loss became (inf|nan).*last good checkpoint is .*last.safetensors"):
        trainer.run()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert state.epoch == 1 and state.step == per_epoch
    assert all(torch.isfinite(v).all() for v in state.net.values() if v.is_floating_point())
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final model from a failed run


def test_a_pickle_planted_as_checkpoint_is_refused(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("model.safetensors", "model.pth"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"state_dict": Payload()}))
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        with pytest.raises(CheckpointError):
            Detector.load(path)
    assert not marker.exists()


def test_backbone_without_the_taps_is_rejected_before_any_data_is_read(tmp_path: Path) -> None:
    from onenip.errors import ConfigError

    cfg = make_config(None, [f"data.roots=[{tmp_path / 'does-not-exist'}]", "backbone.name=vit_tiny_patch16_224",
                             "backbone.weights=random", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="backbone.name.*stride 2"):
        Trainer(cfg, progress=False)


def test_missing_weights_are_rejected_before_any_data_is_read(tmp_path: Path) -> None:
    from onenip.errors import ConfigError

    (tmp_path / "no-data").mkdir()  # a root that exists (a missing one is named first, before the weights)
    base = [f"data.roots=[{tmp_path / 'no-data'}]", f"output_dir={tmp_path / 'run'}"]
    missing = tmp_path / "weights" / "lite0.pth"
    with pytest.raises(ConfigError, match="backbone.weights.*lite0.pth"):
        Trainer(make_config(None, [*base, "backbone.name=tf_efficientnet_lite0", f"backbone.weights={missing}"]),
                progress=False)
    with pytest.raises(ConfigError, match="efficientnet-lite needs backbone.name"):
        Trainer(make_config(None, [*base, "backbone.name=efficientnet_b0", "backbone.weights=efficientnet-lite"]),
                progress=False)
    # with weights that exist, the same run gets as far as its data, and fails there
    with pytest.raises(OnenipError, match="no-data"):
        Trainer(make_config(None, [*base, "backbone.name=tf_efficientnet_lite0", "backbone.weights=random"]),
                progress=False)
    with pytest.raises(OnenipError, match="does-not-exist"):  # and a missing root comes before missing weights
        Trainer(make_config(None, [f"data.roots=[{tmp_path / 'does-not-exist'}]", f"output_dir={tmp_path / 'run'}",
                                   "backbone.name=tf_efficientnet_lite0", f"backbone.weights={missing}"]), progress=False)


def test_bad_training_image_stops_training_or_is_skipped(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    import shutil

    from onenip.errors import DatasetError

    root = tmp_path / "data"
    shutil.copytree(gen_data / "grain", root / "grain")
    victim = sorted((root / "grain" / "train" / "good").iterdir())[3]
    victim.write_bytes(b"")
    base = [f"data.roots=[{root}]", "data.categories=[]", "train.max_steps=1", "data.holdout=0"]
    with pytest.raises(DatasetError, match=victim.name):
        Trainer(tiny(tmp_path / "a", gen_data, gen_textures, *base), progress=False)
    with pytest.warns(UserWarning, match="skip_bad"):
        trainer = Trainer(tiny(tmp_path / "b", gen_data, gen_textures, *base, "data.skip_bad=true"), progress=False)
    assert len(trainer.dataset) == GEN_TRAIN - 1 and [s.image.name for s, _ in trainer.skipped] == [victim.name]
    trainer.run()
    rows = (tmp_path / "b" / "run" / "skipped_train.csv").read_text().splitlines()
    assert len(rows) == 2 and victim.name in rows[1] and "empty" in rows[1]


def test_training_and_evaluation_on_real_data(tmp_path: Path, iad_mix: Path, gen_textures: Path) -> None:
    """Real iad-mix images through a short training and the clean evaluation: grey non-square images (kolektorsdd)
    beside RGB ones (metal_plate), what the generated data does not have. Skipped without the real data."""
    from onenip.evaluation.evaluate import evaluate

    cfg = tiny(tmp_path, iad_mix, gen_textures, "data.categories=[kolektorsdd, metal_plate]", "train.max_steps=2")
    trainer = Trainer(cfg, progress=False)
    result = trainer.run()
    assert result.steps == 2 and np.isfinite(result.history[-1]["loss"])
    res = evaluate(trainer.detector, cfg, progress=False)
    assert {c: (e["images"], e["defective"]) for c, e in res.categories.items()} == {"kolektorsdd": (117, 50),
                                                                                     "metal_plate": (97, 71)}
    assert all(0.0 <= e["fused"]["image_auroc"] <= 1.0 for e in res.categories.values())
