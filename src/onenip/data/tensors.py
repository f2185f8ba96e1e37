"""Samples as tensors at the model's input size, for batched inference (evaluation, calibration)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from onenip.data.files import Sample
from onenip.data.images import read_sample


class SampleImages(Dataset):
    """Test images (and masks, and the paper protocol's prompt images) at the input size, as tensors."""

    def __init__(self, samples: list[Sample], size: int, prompts: list[list[Sample]] | None = None) -> None:
        self.samples, self.size, self.prompts = samples, size, prompts

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = read_sample(self.samples[i], self.size)
        out: dict[str, Any] = {
            "index": i,
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "has_mask": mask is not None,
            "mask": torch.from_numpy(mask) if mask is not None else torch.zeros(self.size, self.size, dtype=torch.bool),
        }
        if self.prompts is not None:  # (K, 3, S, S): the test image's K prompts
            out["prompt"] = torch.stack([torch.from_numpy(np.ascontiguousarray(read_sample(p, self.size)[0].transpose(2, 0, 1)))
                                         for p in self.prompts[i]])
        return out
