"""Command line: every option documented, errors as one clear line, and fit then test end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from onenip import cli
from onenip.config import option_table
from onenip.errors import ConfigError, OnenipWarning


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_option(capsys) -> None:
    text = _help(capsys, "fit")
    for key, *_ in option_table():
        assert f"--{key}" in text, key
    assert "--resume" in text and "--config" in text and "--set" in text
    test_text = _help(capsys, "test")
    assert "--eval.protocol" in test_text and "--data.roots" in test_text and "--model.arch" not in test_text
    # the top help lists every command (its hand-written metavar too) with its one-line help
    top = " ".join(_help(capsys).split())
    commands = cli.build_parser()._subparsers._group_actions[0]
    assert sorted(commands.metavar.strip("{}").split(",")) == sorted(commands.choices)
    for action in commands._choices_actions:
        assert action.help and f"{action.dest} {' '.join(action.help.split())}" in top, action.dest


def test_errors_are_one_line_naming_the_option(capsys, tmp_path: Path) -> None:
    assert cli.main(["fit", "--set", "train.epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epochz" in err and "Traceback" not in err
    assert cli.main(["fit", "--data.input_size", "100"]) == 2
    assert "data.input_size" in capsys.readouterr().err
    assert cli.main(["fit"]) == 2  # no data roots
    assert "data.roots" in capsys.readouterr().err
    assert cli.main(["fit", "--data.roots", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["test", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_fit_then_test(tmp_path: Path, gen_data: Path, capsys) -> None:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(
        f"data:\n  roots: [{gen_data}]\n  categories: [grain]\n  input_size: 64\n  workers: 0\n"
        "backbone:\n  name: tf_efficientnet_lite0\n  weights: efficientnet-lite\n"
        "model:\n  hidden_dim: 64\n  ffn_dim: 128\n  heads: 4\n"
    )
    run = tmp_path / "run"
    code = cli.main(["fit", "--config", str(cfg), "--train.max_steps", "2", "--train.batch_size", "8",
                     "--output_dir", str(run), "--no-progress", "--evaluate"])
    assert code == 0
    out = capsys.readouterr().out
    assert "trained 1 epoch (2 steps)" in out and "| grain |" in out and "| pooled |" in out
    assert "decisions at the model's thresholds" in out and "| **all** |" in out  # clean: the deployed model decides
    assert (run / "model.safetensors").is_file() and (run / "results" / "clean" / "results.json").is_file()
    code = cli.main(["test", str(run / "model.safetensors"), "--eval.protocol", "paper", "--no-progress",
                     "--output", str(tmp_path / "res")])
    assert code == 0
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    assert data["protocol"] == "paper" and list(data["categories"]) == ["grain"]
    # resuming a finished run with more epochs continues it
    code = cli.main(["fit", "--resume", str(run / "checkpoints" / "last.safetensors"), "--train.max_steps", "3",
                     "--no-progress"])
    assert code == 0
    assert "(3 steps)" in capsys.readouterr().out


def test_python_api_is_exported() -> None:
    import onenip

    assert callable(onenip.fit) and callable(onenip.test) and onenip.Config().data.input_size == 224


def test_short_flags_set_their_option_as_any_option_does() -> None:
    """--skip-bad (fit, test) is --data.skip_bad true and --device (test) is --train.device: the same overrides, and
    an error names the flag as typed."""
    from onenip.config import load_config

    args = cli.build_parser().parse_args(["fit", "--skip-bad", "--train.epochs", "3"])
    assert sorted(cli._overrides(args)) == ["data.skip_bad=true", "train.epochs=3"]
    args = cli.build_parser().parse_args(["test", "m.safetensors", "--skip-bad", "--device", "cuda:1"])
    assert sorted(cli._overrides(args)) == ["data.skip_bad=true", "train.device=cuda:1"]
    cfg = load_config(overrides=cli._overrides(args))
    assert cfg.data.skip_bad is True and cfg.train.device == "cuda:1"
    args = cli.build_parser().parse_args(["test", "m.safetensors", "--device", "tpu"])
    with pytest.raises(ConfigError, match=r"^train\.device: must be auto, cpu, cuda or cuda:N, got 'tpu' "
                                          r"\(command line: --device tpu\)$"):
        load_config(overrides=cli._overrides(args))


def test_each_command_line_option_is_validated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One validation per option merged (`load_config`) and one of the whole configuration: none before it."""
    from onenip import config

    calls = []

    class Counting:
        def validate_python(self, *args, **kwargs):
            calls.append(kwargs.get("context"))
            return adapter.validate_python(*args, **kwargs)

    adapter = config._ADAPTER
    monkeypatch.setattr(config, "_ADAPTER", Counting())
    cfg = _cli_config("--train.epochs", "3", "--skip-bad", "--set", "train.lr=0.5")
    assert (cfg.train.epochs, cfg.data.skip_bad, cfg.train.lr) == (3, True, 0.5)
    assert len(calls) == 3 + 1


def test_every_warning_of_onenip_is_an_onenip_warning() -> None:
    """The CLI prints them as one line by their category (their location may name another package's file)."""
    import ast

    calls = []
    for path in Path(cli.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                category = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "category"), None)
                calls.append((f"{path.name}:{node.lineno}", category is not None and ast.unparse(category)))
    assert len(calls) >= 10
    assert [c for c in calls if c[1] != "OnenipWarning"] == []


def test_onenip_warnings_print_as_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(warnings.formatwarning) or 0)
    before = warnings.formatwarning
    assert cli.main(["demo"]) == 0
    assert warnings.formatwarning is before  # restored after the command
    fmt = seen[0]
    ours = str(Path(cli.__file__).parent / "data" / "sources.py")
    assert fmt("data.skip_bad: left out 1", UserWarning, ours, 98, "return read(x)") == \
        "onenip: warning: data.skip_bad: left out 1\n"
    # issued through a decorator (torch.no_grad), the location names torch's file: the category tells it is ours
    assert fmt("no mask", OnenipWarning, str(Path(torch.__file__).parent / "utils" / "_contextlib.py"), 124, "") == \
        "onenip: warning: no mask\n"
    theirs = fmt("deprecated", FutureWarning, "/site-packages/lib/mod.py", 3, "old()")
    assert theirs.startswith("/site-packages/lib/mod.py:3: FutureWarning: deprecated")


def test_demo_options_are_checked_before_any_work(tmp_path: Path, capsys) -> None:
    assert cli.main(["demo", "--steps", "0", "--output", str(tmp_path / "d")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err and not (tmp_path / "d").exists()
    (tmp_path / "e" / "run").mkdir(parents=True)
    assert cli.main(["demo", "--output", str(tmp_path / "e")]) == 2
    assert "already holds a demo run" in capsys.readouterr().err and not (tmp_path / "e" / "data").exists()
    (tmp_path / "f").write_text("mine")  # an output that is a file: an error naming it, the file kept
    assert cli.main(["demo", "--output", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "f").read_text() == "mine"


def test_abbreviated_options_are_not_taken_for_others(capsys) -> None:
    """--train.epoch is not --train.epochs: a prefix of an option is an error, not a silent match."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fit", "--train.epoch", "3"])
    assert "--train.epoch" in capsys.readouterr().err
    assert cli._overrides(cli.build_parser().parse_args(["fit", "--train.epochs", "3"])) == ["train.epochs=3"]


def test_a_mistyped_option_is_named_with_the_closest_one(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["fit", "--train.epohcs", "3"])
    err = capsys.readouterr().err
    assert err.startswith("usage: onenip fit") and "--train.epohcs" in err and "did you mean --train.epochs?" in err


def test_test_offers_no_training_only_options(capsys) -> None:
    """`onenip test` lists only what an evaluation reads; a training-only option is named as such, not ignored."""
    helptext = cli.build_parser()._subparsers._group_actions[0].choices["test"].format_help()
    assert "--data.roots" in helptext and "--eval.protocol" in helptext
    for key in cli.TRAINING_ONLY:
        assert f"--{key} " not in helptext
    for option in ("--data.holdout", "--data.textures"):
        with pytest.raises(SystemExit):
            cli.main(["test", "model.safetensors", option, "x"])
        err = capsys.readouterr().err
        assert err.startswith("usage: onenip test") and f"{option} is read in training only" in err


def _cli_config(*argv: str):
    """The configuration `onenip fit ARGV` would train with (parsed and merged, nothing run)."""
    from onenip.config import load_config

    return load_config(overrides=cli._overrides(cli.build_parser().parse_args(["fit", *argv])))


def test_command_line_values_are_converted_by_the_options_type() -> None:
    """BTAD's categories 01, 02, 03 stay strings; a folder named 010 or yes is that folder; 010 epochs are ten."""
    cfg = _cli_config("--data.categories", "02", "--output_dir", "010", "--data.textures", "yes", "--train.epochs", "010")
    assert cfg.data.categories == ["02"] and cfg.output_dir == "010" and cfg.data.textures == "yes"
    assert cfg.train.epochs == 10
    cfg = _cli_config("--data.categories", "01", "02", "03", "--data.roots", "btad:/data/BTAD", "a, b",
                      "--model.refiner", "no", "--backbone.strides", "4", "8")
    assert cfg.data.categories == ["01", "02", "03"] and cfg.data.roots == ["btad:/data/BTAD", "a, b"]
    assert cfg.model.refiner is False and cfg.backbone.strides == [4, 8]
    assert _cli_config("--data.categories", "[01, 02]").data.categories == ["01", "02"]  # one [a, b] argument
    assert _cli_config("--data.categories", "[]").data.categories == []
    cfg = _cli_config("--set", "data.categories=[bottle, metal_plate]", "--set", "output_dir=010")
    assert cfg.data.categories == ["bottle", "metal_plate"] and cfg.output_dir == "010"


def test_a_bad_command_line_value_names_the_option_as_given(capsys) -> None:
    assert cli.main(["fit", "--train.epochs", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == "onenip: error: train.epochs: expected an integer, got 'abc' (command line: --train.epochs abc)\n"
    assert cli.main(["fit", "--model.refiner", "maybe"]) == 2
    assert "model.refiner: expected true or false" in capsys.readouterr().err
    assert cli.main(["fit", "--set", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown option, did you mean train.epochs? (command line: --set train.epoch=3)" in err
