"""The deployed model: uint8 image batch -> features -> retrieved prompt -> reconstruction -> maps -> fusion -> score
-> decision, as one `nn.Module` (method §6). The Python `Predictor` and `onenip predict` run it, `onenip export` traces
it to ONNX and TorchScript, and calibration scores images with it. Each step is the function of
`onenip.models.scoring` or the `Detector` method that evaluation calls too, so there is one code path.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from onenip.models.deployment import Deployment
from onenip.models.detector import Detector
from onenip.models.prompts import descriptor, nearest, tried_types, type_keys
from onenip.models.scoring import (
    NEAREST_BLOCK,
    added_type_map,
    anomaly_maps,
    candidate_distances,
    colour_column,
    decide,
    fuse,
    image_scores,
    type_banks,
    unknown_scores,
    weigh_maps,
)


class DeployModel(nn.Module):
    """uint8 images (N, 3, S, S) -> dict of score (N,), normalized (N,), anomalous (N,) bool, category (N,) int64,
    similarity (N,), map (N, S, S) float32 (the fused anomaly map), known (N,) bool (False: the image is of no product
    type the model knows, and is not judged: anomalous is False), type_distance (N,) and colour_distance (N,), the
    type check's two measures for the retrieved type (the check tries the `candidates` most similar types:
    `scoring.unknown_scores`). `categories[i]` names category index i.

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
        # retrieval by type mean (eval.retrieval, the model's setting): each type's mean descriptor (K, C)
        self.by_type = detector.cfg.eval.retrieval == "type_mean"
        self.register_buffer("type_keys", type_keys(self.pool_keys, self.pool_category, len(self.categories))
                             if self.by_type else None)
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
        self.scale = float(deployment.fusion_scale) if deployment.fusion_scale is not None else None
        self.kernel = int(deployment.score_kernel)
        # the product-type check: each type's prompt patches (padded to one length) and its limit (inf: no check)
        self.register_buffer("type_bank", type_banks(deployment.pool_feats.float(), self.pool_category,
                                                     len(self.categories), NEAREST_BLOCK,
                                                     deployment.type_coresets))  # (K, M, C)
        self.register_buffer("type_limits", torch.tensor([deployment.type_thresholds.get(c, math.inf)
                                                          for c in self.categories], dtype=torch.float32))  # (K,)
        # its colour half: each type's colour model as a whitening (K, D, D + 1) and its limit (K,) (inf: no check)
        whitening, limits = deployment.colour_check(self.categories)
        self.register_buffer("colour_whitening", whitening)
        self.register_buffer("colour_limits", limits)
        self.texture = whitening.shape[1] > 3  # the colour models read the texture contrast too (calibrated since it)
        level, self.candidates, self.summed = deployment.unknown_rule  # the check's rule: the types it tries, and how
        self.unknown_level = float(level)
        # the banks of prompt patches (A, M, C') of the types with a prompt map (added, and trained with prompt-map
        # fusion), each type's row in them (K,), -1: none, and the weights (K, 2) of its learned and prompt maps
        banks, rows = deployment.prompt_banks(self.categories)
        self.any_prompt = bool((rows >= 0).any())
        self.register_buffer("prompt_banks", banks)
        self.register_buffer("prompt_rows", rows)
        self.register_buffer("map_weights", deployment.map_weights(self.categories))
        self.patch_widths = detector.extractor.patch_widths
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

    def reconstruct(self, feats: Tensor, best: Tensor) -> Tensor:
        """Query features (N, C, H, W) and the indices (N,) of their pool prompts -> F_hat (N, C, H, W), with the pool's
        stored encoding when the prompts are cached (the same function as `ReconstructionNet.reconstruct`)."""
        low = torch.autocast(feats.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()
        with low:
            if self.net.uses_prompt and self.cache_prompts:
                return self.net.decode(self.net.encode(feats), self.pool_encoded[best])
            return self.net.reconstruct(feats, self.pool_feats[best] if self.net.uses_prompt else None)

    def forward(self, images: Tensor, category: Tensor | None = None) -> dict[str, Tensor]:
        """uint8 images (N, 3, S, S) -> the outputs listed in the class docstring. `category` (N,) int64 gives each
        image's product type (an index of `categories`): its prompt is the most similar of that type's pool images
        instead of the most similar of all (or of the type retrieved first, with eval.retrieval type_mean), and the
        product-type check tries that type alone."""
        taps = self.extractor.taps(images)
        feats = self.extractor.combine(taps)  # (N, C, H, W)
        allowed = self.pool_category[None, :] == category[:, None] if category is not None else None  # (N, P)
        kinds = (self.type_keys, self.pool_category) if self.by_type else None
        best, best_sim = (t[:, 0] for t in nearest(self.pool_keys, feats, 1, allowed, kinds))  # (N,) each
        maps = anomaly_maps(self.net, feats, self.reconstruct(feats, best), self.size, self.autocast)
        amap = fuse(maps.rec, maps.ref, self.alpha, self.scale)  # (N, S, S)
        given, category = category is not None, self.pool_category[best]
        tried = tried_types(self.pool_keys, feats, self.pool_category, len(self.categories), category,
                            1 if given else self.candidates, self.type_keys if self.by_type else None)  # (N, R)
        if self.any_prompt:  # the training-free prompt map: alone for an added type, fused for a trained one
            knn = added_type_map(self.extractor.patches(taps), self.prompt_banks, self.prompt_rows[category],
                                 self.patch_widths, self.size)
            amap = weigh_maps(amap, knn, self.map_weights[category])
        score = image_scores(amap, self.kernel)  # (N,)
        distances, colours = candidate_distances(feats, colour_column(images, self.texture), tried, self.type_bank,
                                                 self.colour_whitening)  # (N, R) each
        unknown = unknown_scores(distances, self.type_limits[tried], colours, self.colour_limits[tried], self.summed)
        known = unknown <= self.unknown_level
        distance, colour = distances[:, 0], colours[:, 0]  # the retrieved type's
        normalized, anomalous = decide(score, self.thresholds[category], known)  # an unknown type is not judged
        return {
            "score": score,
            "normalized": normalized,
            "anomalous": anomalous,
            "category": category,
            "similarity": best_sim,
            "map": amap,
            "known": known,
            "type_distance": distance,
            "colour_distance": colour,
        }
