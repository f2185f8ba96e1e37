"""From anomaly maps to the final map and the image score (§6).

fused = alpha * rec + (1 - alpha) * c * ref, with c = (max(rec) + min(rec)) / 2 over a reference set of maps (the whole
test set in the authors' code; normal training images in the clean protocol), so that the refiner's [0, 1] output is
brought to the scale of the reconstruction error. The image score is the maximum of the map average-pooled with a
16 x 16 window (stride 1, no padding).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def fusion_scale(rec_min: float, rec_max: float) -> float:
    """c = (max + min) / 2 of the reconstruction maps of the reference set."""
    return 0.5 * (float(rec_max) + float(rec_min))


def fuse(rec: np.ndarray | Tensor, ref: np.ndarray | Tensor | None, alpha: float, scale: float):
    """alpha * rec + (1 - alpha) * scale * ref (rec alone when there is no refiner map)."""
    if ref is None:
        return rec
    return alpha * rec + (1.0 - alpha) * scale * ref


def image_scores(maps: np.ndarray | Tensor, kernel: int = 16, chunk: int = 64) -> np.ndarray:
    """(N, S, S) maps -> (N,) max of the kernel x kernel mean filter (valid positions only), via an integral image."""
    m = torch.as_tensor(maps)
    n, h, w = m.shape
    k = min(kernel, h, w)
    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, chunk):
        part = m[s : s + chunk].double()
        ii = torch.zeros(part.shape[0], h + 1, w + 1, dtype=torch.float64)
        ii[:, 1:, 1:] = part.cumsum(1).cumsum(2)
        box = ii[:, k:, k:] - ii[:, :-k, k:] - ii[:, k:, :-k] + ii[:, :-k, :-k]  # window sums (n, h-k+1, w-k+1)
        out[s : s + chunk] = (box.flatten(1).amax(1) / (k * k)).cpu().numpy()
    return out
