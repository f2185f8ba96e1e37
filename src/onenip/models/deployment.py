"""What a trained detector needs to judge new images on its own: its prompt pool, fusion constant and thresholds.

A `Deployment` holds a prompt pool (backbone features of a few normal training images of every category; a new image
takes the most similar one, so no category has to be given), the fusion constant c (from training images), one
decision threshold per category and the unknown-type check's limit and colour model, and for each type added after
training (`onenip add-type`) a bank of the stride-8 patches of its prompt images, which its training-free map
compares. A trained type may have such a bank too: with prompt-map fusion (eval.prompt_fusion, beta > 0) its map is
(1 - beta) x the learned map + beta x s_k x its prompt map, s_k bringing the prompt map to the learned one's scale.
`onenip.evaluation.calibration` builds one after training, sets its thresholds and adds types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from onenip.errors import ConfigError
from onenip.models.scoring import colour_whitening, pad_banks, prompt_bank


@dataclass
class Deployment:
    pool_feats: Tensor  # (P, C, H, W) backbone features of the prompt pool
    pool_categories: list[str]  # (P,) category of each pool image
    pool_images: list[str]  # (P,) where each came from
    fusion_scale: float | None  # c of fused = alpha * rec + (1 - alpha) * c * ref; None without a refiner
    thresholds: dict[str, float]  # per category, in raw-score units: anomalous when score > threshold
    calibration: dict[str, Any] = field(default_factory=dict)  # how the thresholds were set, per category
    alpha: float = 0.5
    score_kernel: int = 16
    type_thresholds: dict[str, float] = field(default_factory=dict)  # per category: the largest type distance of a
    # known image (empty: no check, as in models built before it)
    added_types: list[str] = field(default_factory=list)  # types added after training from their prompt images alone
    # (`onenip add-type`): scored by the training-free prompt map, not the learned one
    prompt_patches: dict[str, Tensor] = field(default_factory=dict)  # per added type (and per trained type with
    # prompt-map fusion), its bank (M, C') of the stride-8 patches (`FeatureExtractor.patches`) of its prompt images
    # (`scoring.added_type_bank`): what its prompt map compares a query with
    colour_models: dict[str, dict[str, Any]] = field(default_factory=dict)  # per category, the colour check's model:
    # "mean" (4,) and "precision" (4, 4) of its normal images' `scoring.colour_stats` with the texture row ((3,) and
    # (3, 3), the colour alone, in models calibrated before it), and "limit" (a type without one,
    # as in models built before it: no colour check)
    prompt_fusion: float = 0.0  # beta of prompt-map fusion on trained types (0: the learned map alone, the paper's)
    prompt_scales: dict[str, float] = field(default_factory=dict)  # per trained type with a bank, s_k: the mean of
    # the learned map's per-image maxima over that of its prompt map, on normal training images
    unknown_level: float | None = None  # the product-type check's rule (`unknown_rule`): an image is of an unknown
    # type when, for each of its `unknown_candidates` most similar types, its type and colour distances as fractions
    # of that type's limits sum to more than this; None: the rule of models calibrated before it (either distance of
    # the retrieved type above its limit)
    unknown_candidates: int = 1
    type_coresets: bool = False  # the type check compares a query with a k-center coreset of each type's prompt
    # patches (`scoring.type_check_bank`; models built since the summed rule), False: with every patch (before it)

    def __post_init__(self) -> None:
        self.prompt_patches = {t: _bank(p) for t, p in self.prompt_patches.items()}
        if not 0.0 <= self.prompt_fusion <= 1.0:
            raise ConfigError(f"prompt-map fusion beta must be in [0, 1], got {self.prompt_fusion}")
        if self.unknown_level is not None and not self.unknown_level > 0:
            raise ConfigError(f"the unknown-type level must be > 0, got {self.unknown_level}")
        if self.unknown_candidates < 1:
            raise ConfigError(f"the unknown-type check needs at least 1 candidate type, got {self.unknown_candidates}")

    @property
    def unknown_rule(self) -> tuple[float, int, bool]:
        """(level, candidates, summed) of the product-type check (`scoring.unknown_scores`): an image is of an unknown
        type when its score exceeds the level. Summed: the two fractions of a type summed, least over the candidate
        types; a model calibrated before it: (1, 1, False), the larger fraction of the retrieved type (either
        distance above its limit)."""
        if self.unknown_level is None:
            return 1.0, 1, False
        return self.unknown_level, self.unknown_candidates, True

    @property
    def fused_types(self) -> list[str]:
        """The trained types whose map fuses their prompt map (a bank and a scale, and beta > 0)."""
        if self.prompt_fusion <= 0:
            return []
        return [t for t in self.categories
                if t not in self.added_types and t in self.prompt_patches and t in self.prompt_scales]

    def check_prompt_patches(self) -> None:
        """Raise ConfigError naming every added type without stored patches (a type added by an earlier version of
        onenip, whose prompt map compared other features and whose threshold was set on that map)."""
        missing = [t for t in self.added_types if t not in self.prompt_patches]
        if missing:
            how = "; ".join(f"onenip add-type MODEL --replace --name {t} "
                            + " ".join(self.calibration.get(t, {}).get("added_from", ["IMAGES..."])) for t in missing)
            raise ConfigError(f"product types {missing} were added by an earlier version of onenip, whose prompt map "
                              f"this version does not compute: add them again ({how})")

    def prompt_banks(self, kinds: list[str]) -> tuple[Tensor, Tensor]:
        """The banks of prompt patches of every type scored with a prompt map (the added types, then the
        `fused_types`), padded to one length (`scoring.pad_banks`) -> (A, M, C'), and for each of `kinds` (type
        names, as a model indexes them) the row of its bank (K,) int64, -1 for a type without a prompt map (so
        `rows >= 0` says which types compute one). Without such types, a (1, 1, 1) placeholder of zeros."""
        self.check_prompt_patches()
        rows = {t: i for i, t in enumerate(self.added_types + self.fused_types)}
        banks = pad_banks([self.prompt_patches[t] for t in rows]) if rows else torch.zeros(1, 1, 1)
        return banks, torch.tensor([rows.get(k, -1) for k in kinds], dtype=torch.int64)

    def map_weights(self, kinds: list[str]) -> Tensor:
        """For each of `kinds` the weights (K, 2) float32 of its learned map and of its prompt map in the map it is
        judged by: an added type (0, 1), its prompt map alone; a fused trained type (1 - beta, beta x s_k); any other
        (1, 0), the learned map alone."""
        fused = set(self.fused_types)
        beta = self.prompt_fusion
        return torch.tensor([(0.0, 1.0) if k in self.added_types else
                             (1.0 - beta, beta * self.prompt_scales[k]) if k in fused else (1.0, 0.0) for k in kinds],
                            dtype=torch.float32)

    def colour_check(self, kinds: list[str]) -> tuple[Tensor, Tensor]:
        """For each of `kinds` (type names, as a model indexes them) its colour model as the deployed model and
        evaluation use it: `scoring.colour_whitening` (K, D, D + 1) and the limit (K,) float32; a type without one
        gets a zero whitening (distance 0) and an infinite limit (no check). D is 4 (the colour and the texture
        contrast, `scoring.colour_column`) when a type's model has the texture row, else 3 (models calibrated before
        it); a 3-row model among 4-row ones measures the colour alone (its texture column is zero)."""
        models = [self.colour_models.get(k) for k in kinds]
        d = max([len(m["mean"]) for m in models if m] or [3])
        w = torch.zeros(len(kinds), d, d + 1, dtype=torch.float32)
        for i, m in enumerate(models):
            if m:
                own = colour_whitening(torch.tensor([m["mean"]], dtype=torch.float32),
                                       torch.tensor([m["precision"]], dtype=torch.float32))[0]  # (e, e + 1)
                e = own.shape[0]
                w[i, :e, :e], w[i, :e, d] = own[:, :e], own[:, e]
        limit = torch.tensor([float(m["limit"]) if m else math.inf for m in models], dtype=torch.float32)
        return w, limit

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.pool_categories))

    @property
    def normal_scores(self) -> dict[str, list[float]]:
        """The held-out normal scores kept per type (its calibration's ``normal_scores``; types without them are left
        out): what a threshold at another false alarm rate is set from without data."""
        return {c: info["normal_scores"] for c, info in self.calibration.items()
                if isinstance(info, dict) and info.get("normal_scores")}

    def to_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata) for a checkpoint."""
        meta = {
            "pool_categories": self.pool_categories, "pool_images": self.pool_images,
            "fusion_scale": self.fusion_scale, "thresholds": self.thresholds, "calibration": self.calibration,
            "alpha": self.alpha, "score_kernel": self.score_kernel, "type_thresholds": self.type_thresholds,
            "added_types": self.added_types, "colour_models": self.colour_models,
            "prompt_fusion": self.prompt_fusion, "prompt_scales": self.prompt_scales,
            "unknown_level": self.unknown_level, "unknown_candidates": self.unknown_candidates,
            "type_coresets": self.type_coresets,
        }
        tensors = {"pool_feats": self.pool_feats.detach().cpu().contiguous()}
        for i, t in enumerate(self.prompt_patches):  # names may hold any character: the keys are indices
            tensors[f"prompt_patches.{i}"] = self.prompt_patches[t].detach().cpu().contiguous()
        return tensors, {**meta, "prompt_patch_types": list(self.prompt_patches)}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> "Deployment":
        return cls(
            pool_feats=tensors["pool_feats"], pool_categories=list(meta["pool_categories"]),
            pool_images=list(meta["pool_images"]), fusion_scale=meta["fusion_scale"],
            thresholds={k: float(v) for k, v in meta["thresholds"].items()}, calibration=dict(meta["calibration"]),
            alpha=float(meta["alpha"]), score_kernel=int(meta["score_kernel"]),
            type_thresholds={k: float(v) for k, v in meta.get("type_thresholds", {}).items()},
            added_types=list(meta.get("added_types", [])),
            prompt_patches={t: tensors[f"prompt_patches.{i}"] for i, t in enumerate(meta.get("prompt_patch_types", []))},
            colour_models={k: dict(v) for k, v in meta.get("colour_models", {}).items()},
            prompt_fusion=float(meta.get("prompt_fusion", 0.0)),
            prompt_scales={k: float(v) for k, v in meta.get("prompt_scales", {}).items()},
            unknown_level=None if meta.get("unknown_level") is None else float(meta["unknown_level"]),
            unknown_candidates=int(meta.get("unknown_candidates", 1)),
            type_coresets=bool(meta.get("type_coresets", False)),
        )


def _bank(stored: Tensor) -> Tensor:
    """A bank (M, C'), or the patches (K, C', G, G) that models written before banks were coresets stored (and
    deployments built by older code): all of them, one row each (their thresholds were set on that bank). Every
    Deployment holds banks (`__post_init__`)."""
    return stored if stored.ndim == 2 else prompt_bank(stored)
