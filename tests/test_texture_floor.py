"""The texture contrast's floor (TEXTURE_FLOOR): a type whose normal images barely vary in fine-scale texture is read
to about a tenth of its log energy, so a little more or less grain stays known while a clearly different grain is
unknown (a floor of 0.05, the value it was measured against, let a third of a log unit pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onenip.evaluation.calibration import TEXTURE_FLOOR, colour_model
from onenip.models.scoring import colour_distance, colour_whitening


def test_the_texture_contrast_is_read_to_its_floor() -> None:
    rng = np.random.default_rng(3)
    normal = rng.normal([0.5, 0.0, 0.0, -7.0], [0.002, 0.0005, 0.0005, 0.005], (30, 4))  # grey, one steady grain
    m = colour_model(normal, 1.5)
    assert m is not None and m["texture"]
    whitening = colour_whitening(torch.tensor([m["mean"]]), torch.tensor([m["precision"]]))

    def distance(texture_shift: float) -> float:
        colour = torch.tensor([[0.5, 0.0, 0.0, -7.0 + texture_shift]])[:, :, None]
        return float(colour_distance(colour, whitening)[0])

    assert distance(0.1) < m["limit"] and distance(-0.1) < m["limit"]  # a tenth of a log unit: known
    assert distance(0.3) > m["limit"] and distance(-0.3) > m["limit"]  # a third: another grain, unknown
    assert distance(0.1) == pytest.approx(0.1 / np.sqrt(TEXTURE_FLOOR), rel=0.02)  # the floor, not the spread, rules
