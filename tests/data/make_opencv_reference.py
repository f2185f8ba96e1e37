"""Writes opencv_reference.npz: OpenCV's results for the tests of onenip.colorspaces and synthesis.resize_bilinear.

OpenCV is not a dependency of onenip; this script documents where the reference values come from. The authors' code
pinned OpenCV 4.6, so the file was made with it:

    python -m venv /tmp/cv46 && /tmp/cv46/bin/pip install "opencv-python-headless==4.6.0.66" "numpy<2"
    /tmp/cv46/bin/python tests/data/make_opencv_reference.py

Contents: `pixels` (1, N, 3) uint8 RGB: fixed colours, then random ones from seed 0, in one long row so that OpenCV
takes its vectorised path as on real images (its scalar path rounds some conversions differently). For each colour
space S of imgaug's brightness augmenter: `fwd_S` = cvtColor(pixels, RGB2S), `back_S` = cvtColor(fwd_S, S2RGB) and
`bright_S_j` = the brightness channel changed as imgaug does with the j-th row of `params` (mul, add, add_first),
converted back to RGB. `resize_src` (37, 53, 3) random and `resize_WxH` its cv2.resize(..., INTER_LINEAR) to each
(width, height) of `resize_sizes`.
"""

from pathlib import Path

import cv2
import numpy as np

SPACES = {"YCrCb": (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0), "HSV": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2),
          "HLS": (cv2.COLOR_RGB2HLS, cv2.COLOR_HLS2RGB, 1), "Lab": (cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB, 0),
          "Luv": (cv2.COLOR_RGB2Luv, cv2.COLOR_Luv2RGB, 0), "YUV": (cv2.COLOR_RGB2YUV, cv2.COLOR_YUV2RGB, 0)}
PARAMS = np.array([(1.15, 20, 1), (0.83, -25, 0), (1.0, 30, 0), (1.2, -30, 1)])


def main() -> None:
    rng = np.random.default_rng(0)
    fixed = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
             (0, 255, 255), (255, 0, 255), (1, 2, 3), (250, 128, 10), (20, 40, 200)]
    pixels = np.concatenate([np.array(fixed, np.uint8), rng.integers(0, 256, (500, 3), dtype=np.uint8)])[None]
    out = {"pixels": pixels, "params": PARAMS, "opencv_version": np.array(cv2.__version__)}
    for name, (fwd, back, ch) in SPACES.items():
        conv = cv2.cvtColor(pixels, fwd)
        out[f"fwd_{name}"] = conv
        out[f"back_{name}"] = cv2.cvtColor(conv, back)
        for j, (mul, add, first) in enumerate(PARAMS):
            c = conv.copy()
            x = c[..., ch].astype(np.float64)
            if first:
                x = np.clip(np.round(np.clip(x + add, 0, 255) * mul), 0, 255)
            else:
                x = np.clip(np.clip(np.round(x * mul), 0, 255) + add, 0, 255)
            c[..., ch] = x.astype(np.uint8)
            out[f"bright_{name}_{j}"] = cv2.cvtColor(c, back)
    src = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    sizes = np.array([(11, 7), (64, 64), (53, 100)])  # (width, height)
    out["resize_src"], out["resize_sizes"] = src, sizes
    for w, h in sizes:
        out[f"resize_{w}x{h}"] = cv2.resize(src, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
    np.savez_compressed(Path(__file__).with_name("opencv_reference.npz"), **out)


if __name__ == "__main__":
    main()
