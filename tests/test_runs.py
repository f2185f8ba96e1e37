"""A run folder is never overwritten or mixed without a word: a complete run is not resumed, an earlier run's files
stop a new run, Ctrl-C leaves a checkpoint that resumes exactly, and bad test data stops `fit --evaluate` before
training. Each test fails without the behaviour it names."""

from __future__ import annotations

import logging
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import training_child

from onenip.api import fit, make_config
from onenip.checkpoint import load_checkpoint
from onenip.errors import DatasetError
from onenip.training.trainer import Trainer, TrainingError

CATS = "[bracket, grain]"


def overrides(gen_data: Path, gen_textures: Path, *extra: str) -> list[str]:
    return [f"data.roots=[{gen_data}]", f"data.categories={CATS}", "data.input_size=64", f"data.textures={gen_textures}",
            "data.workers=0", "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
            "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "model.refiner_channels=32",
            "train.batch_size=8", "train.epochs=2", "train.device=cpu", "train.lr=5e-4", *extra]


def test_resuming_a_complete_run_writes_nothing(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    run = tmp_path / "run"
    fit(None, overrides(gen_data, gen_textures, "train.epochs=1", f"output_dir={run}"), progress=False)
    ckpt = run / "checkpoints" / "last.safetensors"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match=r"the run is complete \(1 of 1 epochs\); nothing to resume"):
        fit(None, [], resume=ckpt, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a larger train.epochs continues it
    result = fit(None, ["train.epochs=2"], resume=ckpt, progress=False)
    assert result.epochs == 2


@pytest.mark.parametrize("earlier", ["config.json", "train_log.csv", "results/clean/results.json", "skipped_train.csv"])
def test_an_earlier_run_without_checkpoint_is_not_overwritten(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                              earlier: str) -> None:
    run = tmp_path / "run"
    (run / earlier).parent.mkdir(parents=True, exist_ok=True)
    (run / earlier).write_text("an earlier run's")
    with pytest.raises(TrainingError, match=f"holds an earlier run \\({Path(earlier).parts[0]}\\)"):
        Trainer(make_config(None, overrides(gen_data, gen_textures, f"output_dir={run}")), progress=False)
    assert (run / earlier).read_text() == "an earlier run's"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [earlier]


def test_fit_evaluate_reads_the_test_split_before_training(tmp_path: Path, gen_data: Path, gen_textures: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(gen_data, data)
    bad = sorted((data / "grain" / "test").rglob("*.png"))[0]
    bad.write_bytes(b"not a png")
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=bad.name):
        fit(None, overrides(data, gen_textures, f"output_dir={run}"), evaluate=True, progress=False)
    assert not run.exists()  # stopped before any work: no model, no log


def test_fit_logs_the_categories_and_their_counts(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="onenip"):
        trainer = Trainer(make_config(None, overrides(gen_data, gen_textures, "data.holdout=0.25",
                                                      f"output_dir={tmp_path / 'run'}")), progress=False, evaluate=True)
    text = caplog.text
    train, held = len(trainer.dataset), len(trainer.holdout)
    assert f"2 categories: {train} training images, {held} held out for the thresholds" in text
    for cat in ("bracket", "grain"):
        n_train = sum(s.category == cat for s in trainer.dataset.samples)
        n_held = sum(s.category == cat for s in trainer.holdout)
        n_test = sum(s.category == cat for s in trainer.test_samples)
        assert re.search(rf"{cat} +train +{n_train} +held out +{n_held} +test +{n_test}\n", text), text


def test_ctrl_c_mid_epoch_writes_a_checkpoint_that_resumes_exactly(tmp_path: Path, gen_data: Path,
                                                                    gen_textures: Path) -> None:
    """SIGINT in the middle of epoch 2 (no checkpoint due before the end): the run stops after the step in progress,
    writes its checkpoint with the position in the epoch and prints the resume command; resuming ends with exactly
    the weights of an uninterrupted run."""
    args = overrides(gen_data, gen_textures, "train.epochs=3", "train.save_every=10")
    straight = Trainer(make_config(None, args + [f"output_dir={tmp_path / 'a'}"]), progress=False)
    straight.run()
    per_epoch = len(straight.loader)
    assert per_epoch >= 4

    run_b = tmp_path / "b"
    child, log = training_child(tmp_path, [*args, f"output_dir={run_b}"], until_step=per_epoch + 2)
    child.send_signal(signal.SIGINT)
    child.wait(timeout=120)
    err = log.read_text()
    assert child.returncode != 0  # KeyboardInterrupt once the checkpoint is written
    ckpt = run_b / "checkpoints" / "last.safetensors"
    state = load_checkpoint(ckpt)
    assert state.epoch == 1 and 0 < state.extra["epoch_step"] < per_epoch
    assert state.step == per_epoch + state.extra["epoch_step"]
    assert f"onenip fit --resume {ckpt}" in err and f"step {state.step}" in err, err
    assert not (run_b / "model.safetensors").exists()

    resumed = Trainer(make_config(None, args + [f"output_dir={run_b}"]), resume=ckpt, progress=False)
    assert resumed.epoch_step == state.extra["epoch_step"] and "epoch_step" not in resumed.detector.extra
    resumed.run()
    assert resumed.step == straight.step == 3 * per_epoch
    for (k, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert "epoch_step" not in load_checkpoint(ckpt).extra


def test_predict_says_when_it_removes_an_earlier_runs_outputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from onenip.deploy.predictor import _retire_earlier_run

    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.INFO, logger="onenip"):
        _retire_earlier_run(out)  # nothing there: nothing to say
    assert caplog.text == ""
    (out / "overlays").mkdir()
    (out / "overlays" / "a.png").write_bytes(b"x")
    (out / "predictions.json").write_text('{"predictions": [{"overlay": "overlays/a.png"}]}')
    with caplog.at_level(logging.INFO, logger="onenip"):
        _retire_earlier_run(out)
    assert f"{out} held an earlier predict run: removed its index" in caplog.text and "the 1 overlays" in caplog.text


def test_test_results_replace_the_earlier_ones_and_their_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from onenip.evaluation.evaluate import Results, write_results

    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("report.html", "scores.csv"):
        (folder / name).write_text("of the earlier results")
    with caplog.at_level(logging.INFO, logger="onenip"):
        write_results(Results(protocol="clean", categories={}, fusion_scale=None, retrieval_accuracy=None), folder)
    assert not (folder / "report.html").exists() and "removed" in caplog.text and "report.html" in caplog.text
    assert not (folder / "scores.csv").exists()  # no scores now: the earlier ones are not left beside the new results
    assert f"results written to {folder}" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["results.json", "results.md"]


def test_an_exported_model_given_as_a_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    from onenip.checkpoint import load_checkpoint as load
    from onenip.errors import CheckpointError

    for name, kind in (("model.onnx", "ONNX"), ("model.torchscript.pt", "TorchScript")):
        (tmp_path / name).write_bytes(b"\x08\x07\x12\x04rest of an export")
        with pytest.raises(CheckpointError, match=f"is an exported model \\({kind}\\), not an onenip checkpoint"):
            load(tmp_path / name)


def test_progress_bars_redraw_rarely_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import ast

    from onenip import logs

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = logs.progress_bar(total=10, desc="x", unit="step")
    assert bar.mininterval == logs.LOG_INTERVAL == 60.0  # a CI log gets a line a minute, not hundreds
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = logs.progress_bar(total=10, desc="x", unit="step")
    assert bar.mininterval == logs.TERMINAL_INTERVAL
    bar.close()
    # every bar of the package is made there: no module uses tqdm directly
    src = Path(logs.__file__).parent
    def imports_tqdm(path: Path) -> bool:
        tree = ast.parse(path.read_text())
        return any(isinstance(n, (ast.Import, ast.ImportFrom)) and "tqdm" in ast.dump(n) for n in ast.walk(tree))

    direct = [str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "logs.py" and imports_tqdm(p)]
    assert direct == []


def test_ctrl_c_on_the_last_step_lets_the_run_end(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop asked for during the very last step: nothing is left to resume, so the run writes its model."""
    import contextlib

    import onenip.training.trainer as trainer_module

    trainer = Trainer(make_config(None, overrides(gen_data, gen_textures, "train.epochs=1",
                                                  f"output_dir={tmp_path / 'run'}")), progress=False)
    last = len(trainer.loader)

    @contextlib.contextmanager
    def asked_at_the_last_step():
        yield lambda: trainer.step >= last

    monkeypatch.setattr(trainer_module, "stop_on_sigint", asked_at_the_last_step)
    try:
        result = trainer.run()
    except KeyboardInterrupt:  # (pytest would take it for the user's Ctrl-C and stop the session)
        pytest.fail("the run stopped after its last step instead of writing its model")
    assert result.steps == last and (tmp_path / "run" / "model.safetensors").exists()
