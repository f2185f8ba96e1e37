"""The one inference path: uint8 image batch -> features -> prompt -> reconstruction -> maps -> fusion -> score -> decision.

Scores: the raw score is the maximum of the 16x16 average-pooled fused map. The normalised score is
1 - 2^(-score / threshold): 0 for a zero map, 0.5 exactly at the category's threshold, approaching 1 above; it is
monotone, so it ranks images as the raw score does, and never saturates into ties.

`DeployModel` runs the whole path as one `nn.Module`, used by the Python `Predictor` and exported to ONNX and
TorchScript, so every way of running a model gives the same numbers.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onenip.models.deployment import Deployment
from onenip.models.detector import Detector
from onenip.models.prompts import descriptor


def normalize_score(score: Tensor | np.ndarray | float, threshold: Tensor | np.ndarray | float):
    """1 - 2^(-score / threshold): 0.5 at the threshold, monotone, in [0, 1) for scores >= 0."""
    return 1.0 - 2.0 ** (-score / threshold)


class DeployModel(nn.Module):
    """uint8 images (N, 3, S, S) -> dict of score (N,), normalized (N,), anomalous (N,) bool, category (N,) int64,
    similarity (N,), map (N, S, S) float32 (the fused anomaly map). `categories[i]` names category index i.

    The prompt pool is encoded once (`cache_prompts`; the prompts are fixed once deployed): a query then costs one
    encoder pass, not two. `fast` makes the fast path for a GPU: the backbone runs in bf16 with channels-last
    activations and the transformer under bf16 autocast (same function, bf16 precision; see `optimize`).
    """

    def __init__(self, detector: Detector, deployment: Deployment, cache_prompts: bool = True) -> None:
        super().__init__()
        self.extractor, self.net = detector.extractor, detector.net
        self.size = detector.input_size
        self.categories = deployment.categories
        index = {c: i for i, c in enumerate(self.categories)}
        self.register_buffer("pool_feats", deployment.pool_feats.float())
        self.register_buffer("pool_keys", descriptor(deployment.pool_feats))
        self.register_buffer("pool_category", torch.tensor([index[c] for c in deployment.pool_categories]))
        self.cache_prompts = cache_prompts
        self.autocast: torch.dtype | None = None  # the transformer's autocast dtype (None: float32)
        if self.net.uses_prompt and cache_prompts:  # the prompts are fixed: encode them once (same function)
            with torch.no_grad():
                was_training = self.net.training
                self.net.eval()
                self.register_buffer("pool_encoded", self.net.encode(deployment.pool_feats.float().to(
                    next(self.net.parameters()).device)).detach())  # (P, L, D)
                self.net.train(was_training)
        self.register_buffer("thresholds", torch.tensor([deployment.thresholds[c] for c in self.categories],
                                                        dtype=torch.float32))
        self.alpha = float(deployment.alpha)
        self.scale = float(deployment.fusion_scale) if deployment.fusion_scale is not None else 0.0
        self.kernel = int(deployment.score_kernel)
        self.has_refiner = detector.net.refiner is not None
        self.eval()

    def optimize(self, compile_mode: str | None = None) -> "DeployModel":
        """The fast path on the module's (CUDA) device: bf16 channels-last backbone, bf16 autocast for the transformer,
        and, with `compile_mode` (e.g. "max-autotune" or "reduce-overhead"), torch.compile of the whole forward."""
        cuda = self.pool_feats.device.type == "cuda"
        self.extractor = self.extractor.fast_copy(torch.bfloat16 if cuda else torch.float32)
        self.autocast = torch.bfloat16 if cuda else None
        if compile_mode:
            self.forward = torch.compile(self.forward, mode=compile_mode, dynamic=False)  # type: ignore[method-assign]
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.extractor(images)  # (N, C, H, W)
        sim = descriptor(feats) @ self.pool_keys.T  # (N, P) cosine similarities to the pool
        best_sim, best = sim.max(dim=1)
        low = torch.autocast(feats.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()
        with low:
            if self.net.uses_prompt and self.cache_prompts:
                rec = self.net.decode(self.net.encode(feats), self.pool_encoded[best])  # (N, C, H, W)
            else:
                rec = self.net.reconstruct(feats, self.pool_feats[best] if self.net.uses_prompt else None)
            delta = (rec.float() - feats)  # (N, C, H, W)
            ref_logits = self.net.refiner(delta.abs()) if self.has_refiner else None
        size = (self.size, self.size)
        err = delta.norm(dim=1, keepdim=True)  # (N, 1, H, W)
        amap = F.interpolate(err, size=size, mode="bilinear", align_corners=True)
        if ref_logits is not None:
            ref = torch.sigmoid(F.interpolate(ref_logits.float(), size=size, mode="bilinear", align_corners=True))
            amap = self.alpha * amap + (1.0 - self.alpha) * self.scale * ref
        score = F.avg_pool2d(amap, self.kernel, stride=1).flatten(1).amax(dim=1)  # (N,)
        category = self.pool_category[best]
        threshold = self.thresholds[category].clamp_min(1e-12)
        return {
            "score": score,
            "normalized": normalize_score(score, threshold),
            "anomalous": score > threshold,
            "category": category,
            "similarity": best_sim,
            "map": amap[:, 0],
        }


