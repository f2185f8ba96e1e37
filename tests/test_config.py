"""Configuration: defaults, YAML files, overrides, and rejection of bad keys, types and values (naming the key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onenip.config import Config, config_from_dict, load_config, option_table, parse_override
from onenip.errors import ConfigError


def test_defaults_are_the_papers() -> None:
    c = Config()
    assert (c.data.input_size, c.backbone.name, c.backbone.strides) == (224, "efficientnet_b4", [2, 4, 8, 16])
    m = c.model
    assert (m.hidden_dim, m.heads, m.encoder_layers, m.decoder_layers, m.ffn_dim, m.dropout) == (256, 8, 4, 4, 1024, 0.1)
    assert (m.jitter_scale, m.jitter_prob, m.refiner_channels) == (20.0, 1.0, 128)
    t = c.train
    assert (t.lr, t.weight_decay, t.grad_clip, t.dice_weight, t.batch_size) == (1e-4, 1e-4, 0.1, 0.5, 64)
    assert (c.eval.fusion_alpha, c.eval.score_kernel, c.eval.fpr_limit) == (0.5, 16, 0.3)


def test_yaml_then_overrides_precedence(tmp_path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  epochs: 10\n  lr: 0.001\ndata:\n  roots: [x, y]\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  epochs: 20\n")
    cfg = load_config([a, b], ["train.lr=1e-5", "model.refiner=false", "data.categories=[bottle]"])
    assert cfg.train.epochs == 20  # the later file wins
    assert cfg.train.lr == pytest.approx(1e-5)  # YAML 1.1 reads 1e-5 as a string: parsed as a number here
    assert cfg.model.refiner is False
    assert cfg.data.roots == ["x", "y"] and cfg.data.categories == ["bottle"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=ten", "train.epochs"),
        ("train.epochs=-1", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("data.input_size=100", "data.input_size"),
        ("data.input_size=16", "data.input_size"),
        ("model.arch=transformer", "model.arch"),
        ("train.nonsense=1", "train.nonsense"),
        ("nosection.x=1", "nosection"),
        ("model.refiner=maybe", "model.refiner"),
        ("model.dropout=1.0", "model.dropout"),
        ("backbone.strides=[2, 4, 8, 32]", "backbone.strides"),
        ("synthesis.cutpaste_area=[0.2, 0.1]", "synthesis.cutpaste_area"),
        ("eval.maps=[rec, heat]", "eval.maps"),
        ("train.device=tpu", "train.device"),
        ("model.hidden_dim=250", "model.hidden_dim"),
        ("synthesis.texture_resize=lanczos", "synthesis.texture_resize"),
        ("synthesis.brightness_spaces=[YCrCb, XYZ]", "synthesis.brightness_spaces"),
        ("synthesis.brightness_spaces=[]", "synthesis.brightness_spaces"),
        ("synthesis.brightness_spaces=[HSV, HSV]", "synthesis.brightness_spaces"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_prompt_and_arch_must_agree() -> None:
    with pytest.raises(ConfigError, match="train.prompt"):
        load_config(overrides=["train.prompt=none"])  # OneNIP needs a prompt
    with pytest.raises(ConfigError, match="train.prompt"):
        load_config(overrides=["model.arch=uniad"])  # UniAD takes none
    cfg = load_config(overrides=["model.arch=uniad", "train.prompt=none"])
    assert cfg.model.arch == "uniad"


def test_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([bad])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epoch: 3\n")  # typo of epochs
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config([unknown])


def test_override_syntax() -> None:
    assert parse_override("train.epochs=3") == {"train": {"epochs": 3}}
    assert parse_override("output_dir=runs/x") == {"output_dir": "runs/x"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_round_trip_through_dict() -> None:
    cfg = load_config(overrides=["train.epochs=7", "data.roots=[a]"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_option_table_documents_every_field() -> None:
    rows = option_table()
    keys = {r[0] for r in rows}
    for section, values in Config().to_dict().items():
        if isinstance(values, dict):
            assert {f"{section}.{k}" for k in values} <= keys
    assert all(r[3] for r in rows), "every option needs a help text"


def test_shipped_config_files_load() -> None:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        load_config([f])
    both = load_config([folder / "iad-mix-offline.yaml", folder / "uniad-baseline.yaml"])
    assert both.model.arch == "uniad" and both.backbone.name == "tf_efficientnet_lite0" and both.train.epochs == 180


def test_resolved_padding_is_kept_through_resume_and_test() -> None:
    """A saved model's resolved backbone.padding wins over a later 'auto'; an explicit other value is a conflict; a
    checkpoint from before the option (no padding in it) padded dynamically."""
    from onenip.checkpoint import adopt_resolved, config_of_checkpoint, incompatible_keys

    saved = config_of_checkpoint({"backbone": {"padding": "static"}})
    later = Config()
    assert later.backbone.padding == "auto"
    adopt_resolved(saved, later)
    assert later.backbone.padding == "static"
    assert incompatible_keys(saved, later) == []
    explicit = config_from_dict({"backbone": {"padding": "dynamic"}})
    adopt_resolved(saved, explicit)
    assert incompatible_keys(saved, explicit) == ["backbone.padding"]
    old = config_of_checkpoint({})  # written before backbone.padding existed
    assert incompatible_keys(old, config_from_dict({"backbone": {"padding": "static"}})) == ["backbone.padding"]
    assert incompatible_keys(old, config_from_dict({"backbone": {"padding": "dynamic"}})) == []
    fresh = Config()
    adopt_resolved(old, fresh)
    assert fresh.backbone.padding == "dynamic"
    with pytest.raises(ConfigError, match="backbone.padding"):
        config_from_dict(parse_override("backbone.padding=sometimes"))


def test_yaml_numbers_without_a_dot_and_unreadable_files(tmp_path: Path) -> None:
    good = tmp_path / "a.yaml"
    good.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-5\n")  # YAML 1.1 reads these as strings
    cfg = load_config([good])
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 5e-5
    bad = tmp_path / "b.yaml"
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config([bad])
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="c.yaml cannot be read as UTF-8"):
        load_config([binary])
    with pytest.raises(ConfigError, match="is a folder"):
        load_config([tmp_path])
