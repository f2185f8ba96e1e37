"""Configuration: defaults, YAML files, overrides, and rejection of bad keys, types and values (naming the key)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from onenip.config import (
    STRIDES,
    Config,
    closest,
    config_from_dict,
    load_config,
    merge_dict,
    option_table,
    parse_override,
    schema,
)
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
    """Values stay the text typed (the option's type converts them when merged); a list option reads [a, b]."""
    assert parse_override("train.epochs=3") == {"train": {"epochs": "3"}}
    assert parse_override("output_dir=runs/x") == {"output_dir": "runs/x"}
    assert parse_override("data.categories=[01, 'a, b', yes]") == {"data": {"categories": ["01", "a, b", "yes"]}}
    assert parse_override("data.categories=02") == {"data": {"categories": ["02"]}}
    assert parse_override("data.categories=") == {"data": {"categories": []}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="SECTION.OPTION"):
        parse_override("train.epochs.x=1")
    with pytest.raises(ConfigError, match=r"data\.categories: cannot read the list"):
        parse_override("data.categories=[a, b")


def test_merge_dict_returns_a_new_config_and_changes_neither_argument() -> None:
    cfg = Config()
    values = {"train": {"epochs": "7"}, "data": {"roots": ["a"]}, "output_dir": "x"}
    cfg_before, values_before = copy.deepcopy(cfg), copy.deepcopy(values)
    merged = merge_dict(cfg, values)
    assert (merged.train.epochs, merged.data.roots, merged.output_dir) == (7, ["a"], "x")
    assert merged.train.lr == cfg.train.lr  # the options not given are cfg's
    assert cfg == cfg_before and values == values_before
    merged.data.roots.append("b")  # no list shared with the arguments
    assert values["data"]["roots"] == ["a"] and cfg.data.roots == []
    base = Config()
    assert load_config(overrides=["train.epochs=3"], base=base).train.epochs == 3 and base == Config()


def test_loaded_configs_share_no_mutable_state() -> None:
    """Two loads (from the defaults, or from one base with or without a source merged onto it) give configs that share
    no list with each other or with the base: changing the first changes neither."""
    for base in (None, load_config(overrides=["data.roots=[a]"])):
        for overrides in ([], ["train.epochs=3"]):
            first, second = load_config(overrides=overrides, base=base), load_config(overrides=overrides, base=base)
            before = copy.deepcopy(second)
            assert first is not base
            first.data.roots.append("b")
            first.eval.maps.append("rec")
            first.backbone.strides.append(99)
            assert second == before
            assert base is None or (base.data.roots == ["a"] and base.eval.maps == Config().eval.maps)


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
    line = load_config([folder / "iad-mix-offline.yaml", folder / "line-network.yaml"])  # the line network's preset
    m = line.model
    assert (m.encoder_layers, m.decoder_layers, m.hidden_dim, m.ffn_dim, m.heads, m.refiner_channels) == (2, 2, 128, 512, 4, 64)
    assert m.arch == "onenip" and line.backbone.name == "tf_efficientnet_lite0"


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


def test_the_device_option_and_the_schema_agree() -> None:
    """train.device is checked by one pattern, the schema's: a value one accepts the other accepts."""
    pattern = schema()["$defs"]["TrainConfig"]["properties"]["device"]["pattern"]
    for value in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert re.search(pattern, value), value
        assert load_config(overrides=[f"train.device={value}"]).train.device == value
    for value in ("tpu", "CUDA", "cuda:", "cuda:x", "cuda:\u00b2", "cpu:0"):  # '²' is a digit to str.isdigit
        assert not re.search(pattern, value), value
        with pytest.raises(ConfigError, match=rf"^train\.device: must be auto, cpu, cuda or cuda:N, got {value!r} "):
            load_config(overrides=[f"train.device={value}"])


def test_stride_choices_are_the_validation_the_help_and_the_schema() -> None:
    assert {key: choices for key, *_, choices in option_table()}["backbone.strides"] == STRIDES
    assert schema()["$defs"]["BackboneConfig"]["properties"]["strides"]["items"]["enum"] == list(STRIDES)
    assert load_config(overrides=["backbone.strides=[04, 16]"]).backbone.strides == [4, 16]  # text read as an integer
    with pytest.raises(ConfigError, match=r"^backbone\.strides\[1\]: must be one of 1, 2, 4, 8 or 16, got 32 "):
        load_config(overrides=["backbone.strides=[16, 32]"])
    with pytest.raises(ConfigError, match=r"^backbone\.strides\[0\]: expected an integer, got 'x' "):
        load_config(overrides=["backbone.strides=[x]"])


def test_closest_names_for_did_you_mean() -> None:
    """The one suggester of the configuration's messages and of the command line's."""
    known = ["train.epochs", "train.lr", "data.input_size", "model"]
    assert closest("train.epoch", known) == ["train.epochs"]
    assert closest("epochs", known) == ["train.epochs"]  # no section given: any section's option
    assert closest("train.input_size", known) == ["data.input_size"]
    assert closest("modle", known) == ["model"]
    assert closest("--batch-sise", ["--batch-size", "--output"]) == ["--batch-size"]
    assert closest("train.zzz", known) == [] and closest("x", []) == []
    assert closest("eval.ab", ["data.ab", "train.ab"]) == ["data.ab", "train.ab"]  # ties: all of them


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


# --------------------------------------------------------------------------------------------------------------------
# Values given as text (the command line, KEY=VALUE overrides) are converted by their option's type
# --------------------------------------------------------------------------------------------------------------------


def test_text_values_are_converted_by_the_options_type() -> None:
    """BTAD's categories are 01, 02, 03: a list of strings keeps them; a string option keeps 010 and yes; an integer
    option reads 010 as ten (not octal); only a boolean option reads yes as true."""
    cfg = load_config(overrides=["data.categories=02", "output_dir=010", "backbone.weights=yes", "train.epochs=010",
                                 "model.refiner=no", "train.lr=1e-5", "data.roots=[01, 02]"])
    assert cfg.data.categories == ["02"] and cfg.data.roots == ["01", "02"]
    assert cfg.output_dir == "010" and cfg.backbone.weights == "yes"
    assert cfg.train.epochs == 10 and cfg.model.refiner is False and cfg.train.lr == pytest.approx(1e-5)
    assert load_config(overrides=["data.categories=[01, 02, 03]"]).data.categories == ["01", "02", "03"]
    assert load_config(overrides=["data.textures=on"]).data.textures == "on"
    assert load_config(overrides=["data.textures=/t", "data.textures="]).data.textures is None  # empty: unset
    with pytest.raises(ConfigError, match=r"model\.refiner: expected true or false"):
        load_config(overrides=["model.refiner=on"])


def test_bad_text_values_name_the_option_and_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected an integer, got 'abc' \(override 'train\.epochs=abc'\)$"):
        load_config(overrides=["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown option, did you mean train\.epochs\?"):
        load_config(overrides=["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"epochs: unknown option, did you mean train\.epochs\?"):
        load_config(overrides=["epochs=3"])
    with pytest.raises(ConfigError, match=r"train\.input_size: unknown option, did you mean data\.input_size\?"):
        load_config(overrides=["train.input_size=64"])
    with pytest.raises(ConfigError, match=r"modle: unknown section, did you mean model\?"):
        config_from_dict({"modle": {"arch": "uniad"}})
    with pytest.raises(ConfigError, match=r"train\.lr: expected a finite number"):
        load_config(overrides=["train.lr=inf"])


def test_every_bad_key_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n  lr: 0.001\nmodle:\n  arch: uniad\n")
    with pytest.raises(ConfigError) as exc:
        load_config([bad])
    message = str(exc.value)
    assert f"config file {bad}: 2 errors" in message
    assert "train.epoch: unknown option, did you mean train.epochs?" in message
    assert "modle: unknown section, did you mean model?" in message


def test_a_file_with_numbers_for_strings_says_to_quote_them(tmp_path: Path) -> None:
    """YAML reads an unquoted 01 as the number 1: it is not silently turned into the category '1'."""
    f = tmp_path / "btad.yaml"
    f.write_text("data:\n  categories: [01, '02']\n")
    with pytest.raises(ConfigError, match=r"data\.categories\[0\]: expected a string, got 1 .*quote it.*btad\.yaml"):
        load_config([f])
    f.write_text("data:\n  categories: ['01', '02']\n  roots: /data/btad\n")  # one item for a list: a list of it
    cfg = load_config([f])
    assert cfg.data.categories == ["01", "02"] and cfg.data.roots == ["/data/btad"]


def test_options_that_must_agree_are_checked_once_all_sources_are_merged(tmp_path: Path) -> None:
    cfg = load_config(overrides=["train.cache_features=false", "train.engine=fast", "train.cache_features=true"])
    assert cfg.train.engine == "fast"
    with pytest.raises(ConfigError, match=r"model\.hidden_dim: must be a multiple of model\.heads \(6\), got 256"):
        load_config(overrides=["model.heads=6"])
    assert load_config(overrides=["model.heads=6", "model.hidden_dim=384"]).model.hidden_dim == 384
    with pytest.raises(ConfigError, match=r"eval\.score_kernel: must be at most data\.input_size \(64\)"):
        load_config(overrides=["data.input_size=64", "eval.score_kernel=65"])


def test_sections_check_their_values_when_built_and_assigned() -> None:
    import dataclasses

    from pydantic import ValidationError

    from onenip.config import ModelConfig, SynthesisConfig

    with pytest.raises(ValidationError, match="hidden_dim"):
        ModelConfig(hidden_dim=30, heads=4)
    with pytest.raises(ValidationError, match="scar_width"):
        dataclasses.replace(SynthesisConfig(), scar_width=[16, 2])
    cfg = Config()
    cfg.train.epochs = 5
    with pytest.raises(ValidationError, match="epochs"):
        cfg.train.epochs = 0
    assert cfg.train.epochs == 5 and dataclasses.asdict(cfg)["train"]["epochs"] == 5


def test_the_shipped_json_schema_is_the_codes() -> None:
    import json

    from onenip.config import SCHEMA_PATH, schema_text

    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), (
        "src/onenip/config.schema.json is out of date: regenerate it with "
        "python -c 'from onenip.config import write_schema; write_schema()'"
    )
    schema = json.loads(schema_text())
    train = schema["$defs"]["TrainConfig"]
    assert train["additionalProperties"] is False and train["properties"]["epochs"]["exclusiveMinimum"] == 0
    assert schema["$defs"]["ModelConfig"]["properties"]["arch"]["enum"] == ["onenip", "uniad", "static-prompt"]
    assert all(p.get("description") for d in schema["$defs"].values() for p in d["properties"].values())
