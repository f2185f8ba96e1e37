"""Tests of onenip.colorspaces (imgaug's brightness augmenter on OpenCV's conversions) and of the OpenCV-like texture
resize, against values computed by OpenCV 4.6 (tests/data/make_opencv_reference.py; OpenCV is not a dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from onenip.synthesis import colorspaces as cs
from onenip.synthesis.per_image import augment_texture, resize_bilinear

REF = np.load(Path(__file__).parent / "data" / "opencv_reference.npz")

# Share of pixels whose largest channel difference to OpenCV's brightness result is at most 2 grey levels, at least.
# OpenCV computes several 8-bit conversions in fixed point; the values below hold with a margin on the reference set
# (measured, worst of the four parameter sets: YCrCb/YUV 99.8 %, HSV 97.9 %, HLS 97.1 %, Lab 94.3 %; Luv 92.2 %,
# but 79.7 % when L is lowered by a third, where dark saturated colours leave the RGB gamut and OpenCV clips them
# differently).
MIN_WITHIN_2 = {"YCrCb": 0.99, "YUV": 0.99, "HSV": 0.95, "HLS": 0.95, "Lab": 0.92, "Luv": 0.75}
# Share of values that differ from OpenCV's at all, at most: RGB -> space (measured 0.3-1.1 % for YCrCb/YUV/HSV, 5-7 %
# for HLS/Lab/Luv) and space -> RGB of OpenCV's own values (measured 0 % for YCrCb/HSV/HLS, 0.5 % YUV, 7.7 % Lab,
# 15 % Luv, by at most 1 level except Luv's 5).
MAX_SHARE_FWD = {"YCrCb": 0.01, "YUV": 0.01, "HSV": 0.02, "HLS": 0.06, "Lab": 0.08, "Luv": 0.08}
MAX_SHARE_BACK = {"YCrCb": 0.01, "YUV": 0.01, "HSV": 0.01, "HLS": 0.01, "Lab": 0.1, "Luv": 0.2}
# Share of pixels whose brightness result differs from OpenCV's at all, at most (measured, worst parameter set: YCrCb
# 0.6 %, YUV 2.3 %, HSV 3.3 %, HLS 14.6 %, Lab 27.9 %, Luv 45.5 %). HSV's bound catches a float64 computation of the
# HSV -> RGB truncation (15-43 % of pixels then differ); the parameters below are float64, as they come from numpy.
MAX_SHARE_BRIGHT = {"YCrCb": 0.02, "YUV": 0.04, "HSV": 0.06, "HLS": 0.2, "Lab": 0.35, "Luv": 0.55}


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).unsqueeze(0).float()


def as_array(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).to(torch.uint8).numpy()


@pytest.mark.parametrize("space", cs.SPACES)
def test_conversions_match_opencv(space: str) -> None:
    got = as_array(cs.to_space(as_tensor(REF["pixels"]), space)).astype(int)
    diff = np.abs(got - REF[f"fwd_{space}"].astype(int))
    if space in ("HSV", "HLS"):  # hue on 0..180 is circular: 0 and 180 are the same hue
        diff[..., 0] = np.minimum(diff[..., 0], 180 - diff[..., 0])
    assert diff.max() <= 1 and (diff > 0).mean() <= MAX_SHARE_FWD[space], (space, float((diff > 0).mean()))
    back = as_array(cs.from_space(as_tensor(REF[f"fwd_{space}"]), space)).astype(int)
    diff = np.abs(back - REF[f"back_{space}"].astype(int))
    assert diff.max() <= (6 if space == "Luv" else 1), (space, int(diff.max()))
    assert (diff > 0).mean() <= MAX_SHARE_BACK[space], (space, float((diff > 0).mean()))


@pytest.mark.parametrize("space", cs.SPACES)
def test_brightness_matches_imgaug_on_opencv(space: str) -> None:
    code = torch.tensor([cs.SPACES.index(space)])
    for j, (mul, add, first) in enumerate(REF["params"]):
        got = cs.brightness(as_tensor(REF["pixels"]), code, torch.tensor([mul]), torch.tensor([add]),
                            torch.tensor([bool(first)]))
        diff = np.abs(as_array(got).astype(int) - REF[f"bright_{space}_{j}"].astype(int)).max(axis=-1)
        assert (diff <= 2).mean() >= MIN_WITHIN_2[space], (space, j, float((diff <= 2).mean()))
        assert (diff > 0).mean() <= MAX_SHARE_BRIGHT[space], (space, j, float((diff > 0).mean()))
    if space in ("YCrCb", "YUV", "HSV", "HLS"):  # grey 128 keeps its chroma and its brightness is exactly 128
        grey = cs.brightness(torch.full((1, 3, 1, 1), 128.0), code, torch.tensor([1.15]), torch.tensor([20.0]),
                             torch.tensor([True]))
        assert grey.flatten().tolist() == [170.0] * 3  # (128 + 20) * 1.15 = 170.2


def test_brightness_per_sample_spaces() -> None:
    """A batch mixing spaces and parameters equals the samples one at a time; each space changes the image its own way."""
    rng = np.random.default_rng(1)
    imgs = torch.from_numpy(rng.integers(0, 256, (6, 3, 8, 9))).float()
    space = torch.arange(6)
    mul = torch.tensor([1.1, 0.9, 1.2, 0.8, 1.05, 0.95])
    add = torch.tensor([5.0, -7.0, 0.0, 12.0, -30.0, 30.0])
    first = torch.tensor([True, False, True, False, True, False])
    batch = cs.brightness(imgs, space, mul, add, first)
    for i in range(6):
        one = cs.brightness(imgs[i : i + 1], space[i : i + 1], mul[i : i + 1], add[i : i + 1], first[i : i + 1])
        assert torch.equal(batch[i : i + 1], one)
    same = [cs.brightness(imgs[:1], torch.tensor([s]), mul[:1], add[:1], first[:1]) for s in range(6)]
    assert len({tuple(t.flatten().tolist()) for t in same}) == 6
    assert batch.min() >= 0 and batch.max() <= 255 and torch.equal(batch, batch.round())
    with pytest.raises(ValueError, match="colour space"):
        cs.to_space(imgs, "XYZ")


def test_plain_brightness_augmenter_draws_a_space() -> None:
    """`augment_texture` with the brightness augmenter goes through `colorspaces.brightness` in a drawn space."""
    tex = np.ascontiguousarray(REF["pixels"].reshape(8, 64, 3))
    outs = {augment_texture(tex, np.random.default_rng(s), names=["brightness"]).tobytes() for s in range(12)}
    assert len(outs) >= 10
    rng = np.random.default_rng(3)
    space, mul, add, first = int(rng.integers(6)), rng.uniform(0.8, 1.2), rng.integers(-30, 31), rng.random() < 0.5
    want = cs.brightness(as_tensor(tex), torch.tensor([space]), torch.tensor([mul]), torch.tensor([float(add)]),
                         torch.tensor([bool(first)]))
    assert np.array_equal(augment_texture(tex, np.random.default_rng(3), names=["brightness"]), as_array(want))


@pytest.mark.parametrize("spaces", [("Lab",), ("HSV", "YUV")])
def test_plain_brightness_augmenter_draws_from_the_configured_spaces(spaces: tuple[str, ...]) -> None:
    """`brightness_spaces` restricts the drawn space (imgaug's to_colorspace); the other draws stay the same."""
    tex = np.ascontiguousarray(REF["pixels"].reshape(8, 64, 3))
    for seed in range(6):
        rng = np.random.default_rng(seed)
        space = cs.SPACES.index(spaces[int(rng.integers(len(spaces)))])
        mul, add, first = rng.uniform(0.8, 1.2), rng.integers(-30, 31), rng.random() < 0.5
        want = cs.brightness(as_tensor(tex), torch.tensor([space]), torch.tensor([mul]), torch.tensor([float(add)]),
                             torch.tensor([bool(first)]))
        got = augment_texture(tex, np.random.default_rng(seed), names=["brightness"], brightness_spaces=spaces)
        assert np.array_equal(got, as_array(want)), (spaces, seed)


def test_resize_bilinear_matches_opencv() -> None:
    for w, h in REF["resize_sizes"]:
        got = resize_bilinear(REF["resize_src"], int(w), int(h)).astype(int)
        diff = np.abs(got - REF[f"resize_{w}x{h}"].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.2, (w, h)
