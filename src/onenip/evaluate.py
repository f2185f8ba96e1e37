"""Evaluation on the test split (§6): maps, fusion, image scores and the seven metrics per category and on average.

Metrics (all exact, see `metrics`): image AUROC, AP and F1-max on image scores; pixel AUROC, AP, F1-max and AUPRO
(FPR limit 0.3) on the maps at the input resolution against the masks resized to it (nearest). Labels come from the
dataset (a defective image whose mask is empty still counts as defective). A category with a defective test image
that has no mask is left out of the pixel metrics, with a warning. Means are unweighted over categories.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import atomic_write_csv, atomic_write_text
from .config import Config
from .datasets import Sample, read_sources
from .detector import Detector
from .images import read_sample
from .metrics import image_metrics, pixel_metrics
from .prompts import PromptPool, paper_prompts, pool_samples
from .scoring import fuse, fusion_scale, image_scores

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS


class _Images(Dataset):
    """Test images (and masks, and the paper protocol's prompt images) at the input size, as tensors."""

    def __init__(self, samples: list[Sample], size: int, prompts: list[Sample] | None = None) -> None:
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
        if self.prompts is not None:
            prompt, _ = read_sample(self.prompts[i], self.size)
            out["prompt"] = torch.from_numpy(np.ascontiguousarray(prompt.transpose(2, 0, 1)))
        return out


@dataclass
class Results:
    """Per-category metrics of each scored map ('rec', 'ref', 'fused'), in [0, 1]; nan where undefined."""

    protocol: str
    categories: dict[str, dict[str, Any]]
    fusion_scale: float | None
    retrieval_accuracy: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    scores: list[dict[str, Any]] = field(default_factory=list)  # one row per test image

    def mean(self, map_name: str = "fused") -> dict[str, float]:
        out = {}
        for m in METRICS:
            vals = [c[map_name][m] for c in self.categories.values() if map_name in c and not math.isnan(c[map_name][m])]
            out[m] = float(np.mean(vals)) if vals else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        maps = sorted({k for c in self.categories.values() for k in ("rec", "ref", "fused") if k in c})
        return {
            "protocol": self.protocol,
            "fusion_scale": self.fusion_scale,
            "retrieval_accuracy": self.retrieval_accuracy,
            "seconds": self.seconds,
            "categories": self.categories,
            "mean": {m: self.mean(m) for m in maps},
        }

    def to_markdown(self, map_name: str = "fused") -> str:
        names = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]
        lines = ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

        def fmt(v: float) -> str:
            return "—" if math.isnan(v) else f"{100 * v:.1f}"

        for cat, res in self.categories.items():
            lines.append(f"| {cat} | " + " | ".join(fmt(res[map_name][m]) for m in METRICS) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{fmt(v)}**" for v in self.mean(map_name).values()) + " |")
        return "\n".join(lines)


def _loader(ds: Dataset, cfg: Config) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.workers)


@torch.no_grad()
def _features_of(detector: Detector, samples: list[Sample], cfg: Config) -> torch.Tensor:
    dev = next(detector.parameters()).device
    feats = [detector.features(b["image"].to(dev)) for b in _loader(_Images(samples, cfg.data.input_size), cfg)]
    return torch.cat(feats)


@torch.no_grad()
def build_prompt_pool(detector: Detector, train: list[Sample], cfg: Config) -> PromptPool:
    samples = pool_samples(train, cfg.eval.prompt_pool, cfg.eval.seed)
    return PromptPool(samples, _features_of(detector, samples, cfg))


@torch.no_grad()
def train_fusion_scale(detector: Detector, train: list[Sample], pool: PromptPool | None, cfg: Config) -> float:
    """c of the clean protocol: (max + min) / 2 of the reconstruction maps of normal training images (not in the pool)."""
    exclude = {s.image for s in pool.samples} if pool is not None else set()
    samples = pool_samples(train, cfg.eval.fusion_images, cfg.eval.seed + 1, exclude=exclude)
    feats = _features_of(detector, samples, cfg)
    lo, hi = math.inf, -math.inf
    for s in range(0, feats.shape[0], cfg.eval.batch_size):
        f = feats[s : s + cfg.eval.batch_size]
        pf = pool.feats[pool.retrieve(f)[0]] if pool is not None else None
        rec = detector.maps(f, pf).rec
        lo, hi = min(lo, float(rec.min())), max(hi, float(rec.max()))
    return fusion_scale(lo, hi)


@torch.no_grad()
def evaluate(detector: Detector, cfg: Config, progress: bool = True, samples: list[Sample] | None = None) -> Results:
    """Evaluate `detector` on the test split of cfg.data.roots under cfg.eval.protocol."""
    t_start = time.perf_counter()
    detector.eval()
    dev = next(detector.parameters()).device
    e, size = cfg.eval, cfg.data.input_size
    cats = cfg.data.categories or None
    test = samples if samples is not None else read_sources(cfg.data.roots, "test", cats)
    train = read_sources(cfg.data.roots, "train", cats)
    prompt_samples = paper_prompts(test, train, e.seed) if detector.uses_prompt and e.protocol == "paper" else None
    pool = build_prompt_pool(detector, train, cfg) if detector.uses_prompt and e.protocol == "clean" else None
    has_ref = detector.net.refiner is not None
    scale = train_fusion_scale(detector, train, pool, cfg) if has_ref and e.protocol == "clean" else None

    n = len(test)
    rec_maps = np.empty((n, size, size), dtype=np.float32)
    ref_maps = np.empty((n, size, size), dtype=np.float32) if has_ref else None
    masks = np.zeros((n, size, size), dtype=bool)
    has_mask = np.zeros(n, dtype=bool)
    retrieved: list[str | None] = [None] * n
    similarity = np.full(n, np.nan)
    t0 = time.perf_counter()
    loader = _loader(_Images(test, size, prompt_samples), cfg)
    for batch in tqdm(loader, desc="test", unit="batch", disable=not progress, dynamic_ncols=True):
        idx = batch["index"].numpy()
        feats = detector.features(batch["image"].to(dev))
        prompt_feats = None
        if prompt_samples is not None:
            prompt_feats = detector.features(batch["prompt"].to(dev))
        elif pool is not None:
            j, sim = pool.retrieve(feats)
            prompt_feats = pool.feats[j]
            for k, jj, ss in zip(idx, j.tolist(), sim.tolist()):
                retrieved[k], similarity[k] = pool.categories[jj], ss
        maps = detector.maps(feats, prompt_feats)
        rec_maps[idx] = maps.rec.cpu().numpy()
        if ref_maps is not None:
            ref_maps[idx] = maps.ref.cpu().numpy()
        masks[idx] = batch["mask"].numpy()
        has_mask[idx] = batch["has_mask"].numpy()
    t_infer = time.perf_counter() - t0
    if has_ref and scale is None:  # paper protocol: from the whole test set (transductive, as the authors' code)
        scale = fusion_scale(float(rec_maps.min()), float(rec_maps.max()))

    t1 = time.perf_counter()
    labels = np.array([s.label for s in test])
    categories: dict[str, dict[str, Any]] = {}
    score_rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for cat in sorted({s.category for s in test}):
        sel = np.flatnonzero([s.category == cat for s in test])
        lab = labels[sel]
        pixel_ok = bool(np.all(has_mask[sel][lab == 1]))
        if not pixel_ok:
            warnings.warn(f"category {cat}: {int(np.sum(~has_mask[sel][lab == 1]))} defective test images have no "
                          "mask; the category is left out of the pixel metrics", stacklevel=2)
        entry: dict[str, Any] = {"images": int(len(sel)), "defective": int(lab.sum()), "pixel_metrics": pixel_ok}
        if pool is not None:
            entry["retrieval_accuracy"] = float(np.mean([retrieved[i] == cat for i in sel]))
        for name in e.maps:
            if name == "ref" and not has_ref:
                continue  # no refiner: the fused map is the reconstruction map
            if name == "rec":
                m = rec_maps[sel]
            elif name == "ref":
                m = ref_maps[sel]
            else:
                m = fuse(rec_maps[sel], ref_maps[sel], e.fusion_alpha, scale) if has_ref else rec_maps[sel]
            scores = image_scores(m, e.score_kernel)
            im = image_metrics(scores, lab)
            res = {"image_auroc": im["auroc"], "image_ap": im["ap"], "image_f1max": im["f1_max"]}
            if pixel_ok:
                pm = pixel_metrics(m, masks[sel], e.fpr_limit)
                res.update({"pixel_auroc": pm["auroc"], "pixel_ap": pm["ap"], "pixel_f1max": pm["f1_max"],
                            "pixel_aupro": pm["aupro"]})
            else:
                res.update({k: float("nan") for k in PIXEL_METRICS})
            entry[name] = res
            for i, sc in zip(sel, scores):
                score_rows[i][f"score_{name}"] = float(sc)
        categories[cat] = entry
    for i, s in enumerate(test):
        score_rows[i] = {"image": str(s.image), "category": s.category, "defect": s.defect, "label": s.label,
                         "retrieved": retrieved[i], "similarity": None if math.isnan(similarity[i]) else
                         round(float(similarity[i]), 6), **score_rows[i]}
    retrieval = float(np.mean([retrieved[i] == s.category for i, s in enumerate(test)])) if pool is not None else None
    seconds = {"inference": round(t_infer, 3), "metrics": round(time.perf_counter() - t1, 3),
               "total": round(time.perf_counter() - t_start, 3), "images_per_s": round(n / max(t_infer, 1e-9), 2)}
    return Results(protocol=e.protocol, categories=categories, fusion_scale=scale, retrieval_accuracy=retrieval,
                   seconds=seconds, scores=score_rows)


def write_results(results: Results, folder: str | Path) -> Path:
    """results.json, results.md (a table per scored map) and scores.csv (one row per test image) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = results.to_dict()
    atomic_write_text(folder / "results.json", json.dumps(data, indent=2, allow_nan=True))
    md = [f"# Test results ({results.protocol} protocol)", ""]
    if results.retrieval_accuracy is not None:
        md += [f"Prompt retrieval picked the right category for {100 * results.retrieval_accuracy:.2f} % of test images.", ""]
    for name in data["mean"]:
        md += [f"## map: {name}", "", results.to_markdown(name), ""]
    atomic_write_text(folder / "results.md", "\n".join(md))
    if results.scores:
        atomic_write_csv(folder / "scores.csv", results.scores)
    return folder
