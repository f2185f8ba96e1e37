"""Training losses (§5): feature MSE for reconstruction and restoration (Eq. 4, 5) and the refiner's Dice loss (Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def feature_mse(rec: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the whole (B, C, H, W) tensor. With B = [normal; synthetic] this is half the
    reconstruction MSE plus half the restoration MSE, as in the reference (one MSE over both halves)."""
    return F.mse_loss(rec.float(), target.float())


def dice_loss(logits: Tensor, masks: Tensor, standard: bool = False, smooth: float = 1.0) -> Tensor:
    """Dice loss of sigmoid(logits) against binary masks, both (B, 1, S, S), averaged over samples.

    Per sample: 1 - (k * sum(p*g) + smooth) / (sum(p^2) + sum(g^2) + smooth), k = 1 as in the reference code (§4: no
    factor 2; its minimum is about 0.5 for anomalous samples, 0 for normal ones) or k = 2 with `standard`.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    g = masks.float().flatten(1)
    k = 2.0 if standard else 1.0
    inter = (p * g).sum(1)
    dice = (k * inter + smooth) / ((p * p).sum(1) + (g * g).sum(1) + smooth)
    return (1.0 - dice).mean()
