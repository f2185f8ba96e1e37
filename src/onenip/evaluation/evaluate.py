"""Evaluation on the test split (§6): maps, fusion, image scores and the seven metrics per category and on average.

Metrics (all exact, see `onenip.evaluation.metrics`): image AUROC, AP and F1-max on image scores; pixel AUROC, AP, F1-max and AUPRO
(FPR limit 0.3) on the maps at the input resolution against the masks resized to it (nearest). Labels come from the
dataset (a defective image whose mask is empty still counts as defective). A category with a defective test image
that has no mask is left out of the pixel metrics, with a warning. Means are unweighted over categories.

The clean protocol evaluates the model as deployed: its prompt pool and fusion constant are drawn as `fit` draws the
deployment's (same training images, less the held-out ones, same categories, same seeds), whatever subset of
categories is evaluated. Every model retrieves the most similar pool image, as the deployed model does (a model without
prompts uses it only to pick the category whose threshold applies), so retrieval accuracy is reported for all.

Beyond the per-category metrics and their mean:

* pooled image metrics: AUROC, AP and F1-max of all test images' scores ranked together, whatever their category.
  A unified model has to be judged with one ranking too: a mean of per-category AUROCs near 1 can hide scores that
  are not comparable between categories (a good image of one scoring above a defective image of another).
* decisions at the model's own thresholds (clean protocol, one prompt, the deployment's prompt pool and fusion
  constant: what `onenip predict` decides, image for image): per category, false alarms among the good images and
  misses among the defective ones, and the pooled metrics of the threshold-relative score `score / threshold` (the
  ranking of `predict`'s normalised score).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from onenip.checkpoint import atomic_write_csv, atomic_write_text, file_sha256
from onenip.config import Config
from onenip.data import Sample, load_split
from onenip.data.tensors import SampleImages
from onenip.errors import ConfigError, DatasetError, OnenipWarning
from onenip.evaluation.metrics import image_metrics, pixel_metrics
from onenip.logs import progress_bar
from onenip.models.deployment import Deployment
from onenip.models.detector import Detector
from onenip.models.prompts import PromptPool, paper_prompt_sets, pool_samples
from onenip.models.scoring import (
    MIN_THRESHOLD,
    Maps,
    added_type_map,
    candidate_distances,
    colour_column,
    decide,
    fuse,
    fusion_scale,
    image_scores,
    mean_maps,
    unknown_scores,
    weigh_maps,
)

log = logging.getLogger(__name__)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS
METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")  # of METRICS, in tables


def defined_values(rows: Iterable[Mapping[str, float]], metrics: Sequence[str] = METRICS) -> dict[str, list[float]]:
    """Per metric of `metrics`, its values in the rows (one per category) where it is defined (not nan: no masks, or
    one class only)."""
    rows = list(rows)
    return {m: [float(r[m]) for r in rows if not math.isnan(r[m])] for m in metrics}


def defined_means(rows: Iterable[Mapping[str, float]], metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Per metric, the unweighted mean of `defined_values` (nan where no row defines it): `Results.mean`'s rule for
    any per-category metric dicts (benchmarks use it)."""
    return {m: float(np.mean(v)) if v else float("nan") for m, v in defined_values(rows, metrics).items()}


@dataclass
class Results:
    """Per-category metrics of each scored map ('rec', 'ref', 'fused'), in [0, 1]; nan where undefined."""

    protocol: str
    categories: dict[str, dict[str, Any]]
    fusion_scale: float | None
    retrieval_accuracy: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    scores: list[dict[str, Any]] = field(default_factory=list)  # one row per test image
    skipped: list[dict[str, str]] = field(default_factory=list)  # test files left out by data.skip_bad, with reasons
    checkpoint: str | None = None  # the model evaluated, when it came from a file
    decisions: dict[str, Any] | None = None  # at the deployed thresholds (see `decision_summary`); None: not applicable
    decisions_note: str | None = None  # why there are no decisions

    def __repr__(self) -> str:  # a summary: the per-image scores of a test set are thousands of rows
        mean = self.mean(self.main_map) if self.maps else {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in mean.items() if k in ("image_auroc", "pixel_ap"))
        return (f"Results(protocol={self.protocol!r}, categories={len(self.categories)}, images={len(self.scores)}, "
                f"maps={self.maps}" + (f", mean {shown}" if shown else "") + ")")

    @property
    def maps(self) -> list[str]:
        """The scored maps, of 'rec', 'ref' and 'fused' (a model without refiner has no 'ref')."""
        return [m for m in ("rec", "ref", "fused") if any(m in c for c in self.categories.values())]

    @property
    def main_map(self) -> str:
        """The map a one-line summary reports: 'fused', or the first scored one when eval.maps leaves it out."""
        return "fused" if "fused" in self.maps else self.maps[0]

    def _check_map(self, map_name: str) -> None:
        if map_name not in self.maps:
            raise KeyError(f"map {map_name!r} was not scored; scored: {', '.join(self.maps) or 'none'}")

    def pooled(self, map_name: str = "fused") -> dict[str, float]:
        """Image AUROC, AP and F1-max of all test images' scores ranked together (nan without both classes)."""
        self._check_map(map_name)
        rows = [r for r in self.scores if f"score_{map_name}" in r]
        return image_entry([r[f"score_{map_name}"] for r in rows], [r["label"] for r in rows])

    def _rows(self, map_name: str) -> list[dict[str, float]]:
        """The metrics of `map_name` in each category that scored it."""
        self._check_map(map_name)
        return [c[map_name] for c in self.categories.values() if map_name in c]

    def mean(self, map_name: str = "fused") -> dict[str, float]:
        """Unweighted mean over the categories where each metric is defined (see `counts`)."""
        return defined_means(self._rows(map_name))

    def counts(self, map_name: str = "fused") -> dict[str, int]:
        """How many categories each mean covers."""
        return {m: len(v) for m, v in defined_values(self._rows(map_name)).items()}

    def to_dict(self) -> dict[str, Any]:
        maps = sorted(self.maps)
        return {
            "protocol": self.protocol,
            "checkpoint": self.checkpoint,
            "fusion_scale": self.fusion_scale,
            "retrieval_accuracy": self.retrieval_accuracy,
            "seconds": self.seconds,
            "skipped": self.skipped,
            "categories": self.categories,
            "mean": {m: self.mean(m) for m in maps},
            "pooled": {m: self.pooled(m) for m in maps},
            "decisions": self.decisions,
            "decisions_note": self.decisions_note,
        }

    def to_markdown(self, map_name: str = "fused") -> str:
        self._check_map(map_name)
        lines = ["| category | " + " | ".join(METRIC_NAMES) + " |", "|---|" + "---:|" * len(METRIC_NAMES)]

        def fmt(v: float) -> str:
            return "—" if math.isnan(v) else f"{100 * v:.1f}"

        for cat, res in self.categories.items():
            lines.append(f"| {cat} | " + " | ".join(fmt(res[map_name][m]) for m in METRICS) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{fmt(v)}**" for v in self.mean(map_name).values()) + " |")
        pooled = self.pooled(map_name)
        lines.append("| pooled | " + " | ".join(fmt(pooled.get(m, float("nan"))) for m in METRICS) + " |")
        counts = dict(zip(METRIC_NAMES, self.counts(map_name).values()))
        none = [name for name, n in counts.items() if n == 0]
        short = [f"{name} {n}" for name, n in counts.items() if 0 < n < len(self.categories)]
        if none:
            lines += ["", f"No category defines {', '.join(none)} (pixel metrics need defective images with masks; "
                      "image metrics need good and defective images)."]
        if short:
            lines += ["", f"Means over fewer than the {len(self.categories)} categories (where the metric is defined): "
                      + ", ".join(short) + "."]
        lines += ["", "pooled: all test images' scores ranked together, whatever their category (image metrics only)."]
        return "\n".join(lines)

    def decisions_markdown(self) -> str:
        """The table of decisions at the model's thresholds, or why there is none."""
        d = self.decisions
        if d is None:
            return f"No decisions: {self.decisions_note or 'not computed'}."

        def rate(k: int, n: int) -> str:
            return "—" if n == 0 else f"{k} / {n} ({100 * k / n:.1f} %)"

        lines = ["| category | false alarms (good flagged) | misses (defective passed) | of an unknown type (not judged) |",
                 "|---|---:|---:|---:|"]
        for cat, c in {**d["categories"], "**all**": d["all"]}.items():
            lines.append(f"| {cat} | {rate(c['false_alarms'], c['good'])} | {rate(c['missed'], c['defective'])} | "
                         f"{rate(c.get('unknown', 0), c['good'] + c['defective'])} |")
        p = d["pooled_relative"]
        sources = sorted({str(c["source"]) for c in d.get("calibration", {}).values() if "source" in c})
        lines += ["", "Thresholds" + (f" (from {', '.join(sources)})" if sources else "") + ": "
                  + "; ".join(f"{cat} {t:.6g}" for cat, t in d["thresholds"].items()) + ".",
                  "Pooled metrics of score / threshold (the ranking of predict's normalised score): "
                  + ", ".join(f"{n} {100 * p[k]:.1f}" for n, k in zip(METRIC_NAMES, IMAGE_METRICS))
                  + "."]
        return "\n".join(lines)


def _loader(ds: Dataset, cfg: Config) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.workers)


def _batched(detector: Detector, samples: list[Sample], cfg: Config, fn: Any) -> Iterator[Any]:
    """fn(images on the detector's device) per batch of the samples' images at cfg.data.input_size."""
    dev = next(detector.parameters()).device
    for b in _loader(SampleImages(samples, cfg.data.input_size), cfg):
        yield fn(b["image"].to(dev))


@torch.no_grad()
def features_of(detector: Detector, samples: list[Sample], cfg: Config) -> torch.Tensor:
    """Backbone features (N, C, h, w) of the samples' images at cfg.data.input_size, on the detector's device."""
    return torch.cat(list(_batched(detector, samples, cfg, detector.features)))


@torch.no_grad()
def features_and_patches_of(detector: Detector, samples: list[Sample], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """`features_of` and the prompt map's patches (N, C', 2h, 2w) (`Detector.features_and_patches`) of the samples."""
    both = list(_batched(detector, samples, cfg, detector.features_and_patches))
    return torch.cat([f for f, _ in both]), torch.cat([p for _, p in both])


def model_categories(detector: Detector) -> list[str] | None:
    """The categories a model was trained on (None for a model that recorded none)."""
    if detector.extra.get("categories"):
        return sorted(detector.extra["categories"])
    return detector.deployment.categories if detector.deployment is not None else None


def prompt_source(detector: Detector, cfg: Config) -> list[Sample]:
    """The normal training images prompts and the clean fusion constant are drawn from, as for the deployed model:
    those of every category the model knows, not only of the evaluated ones (retrieval must not be told which
    categories to expect), less the images held out of training for its thresholds. On other roots than the model's
    (new categories), their training images of the evaluated categories."""
    skip, threads, cats = cfg.data.skip_bad, max(1, cfg.data.workers), cfg.data.categories or None
    known = model_categories(detector)
    try:
        train, _ = load_split(cfg.data.roots, "train", known or cats, skip, threads)
    except DatasetError as exc:
        if known is None:
            raise
        train, _ = load_split(cfg.data.roots, "train", cats, skip, threads)
        warnings.warn(f"the model's categories are not all in {cfg.data.roots} ({exc}); prompts come from the "
                      "evaluated categories' training images", OnenipWarning, stacklevel=2)
    held = set(detector.extra.get("holdout", []))
    return [s for s in train if str(s.image) not in held]


@torch.no_grad()
def build_prompt_pool(detector: Detector, train: list[Sample], cfg: Config) -> PromptPool:
    samples = pool_samples(train, cfg.eval.prompt_pool, cfg.eval.seed)
    return PromptPool(samples, features_of(detector, samples, cfg), cfg.eval.retrieval)


def fusion_samples(train: list[Sample], pool: Sequence[Sample], cfg: Config) -> list[Sample]:
    """The normal training images the clean fusion constant is set on, eval.fusion_images per category drawn from
    `train` outside the prompt pool's images `pool` (the scales of prompt-map fusion are set on them too)."""
    return pool_samples(train, cfg.eval.fusion_images, cfg.eval.seed + 1, exclude={s.image for s in pool})


@torch.no_grad()
def train_fusion_scale(detector: Detector, train: list[Sample], pool: PromptPool | None, cfg: Config) -> float:
    """c of the clean protocol: (max + min) / 2 of the reconstruction maps of normal training images (not in the pool)."""
    samples = fusion_samples(train, pool.samples if pool is not None else [], cfg)
    feats = features_of(detector, samples, cfg)
    lo, hi = math.inf, -math.inf
    for s in range(0, feats.shape[0], cfg.eval.batch_size):
        f = feats[s : s + cfg.eval.batch_size]
        if pool is None or not detector.uses_prompt:
            rec = detector.maps(f, None).rec
        else:  # the maps the test images get: the mean over their eval.prompts most similar prompts
            j = pool.retrieve_top(f, cfg.eval.prompts)[0]
            rec = mean_maps([detector.maps(f, pool.feats[j[:, k]]) for k in range(j.shape[1])]).rec
        lo, hi = min(lo, float(rec.min())), max(hi, float(rec.max()))
    return fusion_scale(lo, hi)


def image_entry(scores: Any, labels: Any) -> dict[str, float]:
    """image_auroc, image_ap, image_f1max of image scores (nan without both classes, or without images)."""
    if len(scores) == 0:
        return dict.fromkeys(IMAGE_METRICS, float("nan"))
    im = image_metrics(np.asarray(scores, dtype=np.float64), np.asarray(labels))
    return {"image_auroc": im["auroc"], "image_ap": im["ap"], "image_f1max": im["f1_max"]}


def category_metrics(maps: np.ndarray, masks: np.ndarray | None, labels: np.ndarray, cfg: Config) -> tuple[dict, np.ndarray]:
    """Seven metrics of one category's maps (pixel metrics nan without usable masks) and the image scores."""
    scores = image_scores(torch.from_numpy(maps), cfg.eval.score_kernel).double().numpy()
    res = image_entry(scores, labels)
    if masks is not None:
        pm = pixel_metrics(maps, masks, cfg.eval.fpr_limit)
        res.update({"pixel_auroc": pm["auroc"], "pixel_ap": pm["ap"], "pixel_f1max": pm["f1_max"],
                    "pixel_aupro": pm["aupro"]})
    else:
        res.update({k: float("nan") for k in PIXEL_METRICS})
    return res, scores


def read_test(detector: Detector, cfg: Config, samples: list[Sample] | None = None,
              skipped: list[tuple[Sample, str]] | None = None) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """The test images to evaluate (read from cfg.data.roots unless given) and the unusable ones left out.

    A labelled folder in test layout is enough (the model carries what it learned from its training images). Test
    categories the model was not trained on are left out, with a warning naming them, unless data.categories names
    them: their images would be judged with the prompts and thresholds of other categories."""
    if samples is None:
        samples, skipped = load_split(cfg.data.roots, "test", cfg.data.categories or None, cfg.data.skip_bad,
                                      max(1, cfg.data.workers), labelled_only=True)
    known = model_categories(detector)
    if known is not None and detector.deployment is not None:  # types added after training are the model's too
        known = sorted(set(known) | set(detector.deployment.added_types))
    unknown = sorted({s.category for s in samples} - set(known or [])) if known is not None else []
    asked = [c for c in unknown if c in (cfg.data.categories or [])]
    left_out = [c for c in unknown if c not in asked]
    if left_out:
        n = sum(s.category in left_out for s in samples)
        warnings.warn(f"test categories {', '.join(left_out)} are not among the model's ({', '.join(known or [])}): "
                      f"their {n} images are left out of the results; name them in data.categories to evaluate them "
                      "anyway", OnenipWarning, stacklevel=3)
        samples = [s for s in samples if s.category not in left_out]
    if asked:
        warnings.warn(f"test categories {', '.join(asked)} are not among the model's: their images are judged with the "
                      "prompts and thresholds of the categories they are matched to", OnenipWarning, stacklevel=3)
    if not samples:
        raise DatasetError(f"no test images of the model's categories ({', '.join(known or [])}) in {cfg.data.roots}")
    return samples, list(skipped or [])


def prompt_setup(detector: Detector, cfg: Config, test: list[Sample]
                 ) -> tuple[PromptPool | None, list[list[Sample]] | None, list[Sample] | None]:
    """(prompt pool the clean protocol retrieves from, the paper protocol's prompts of each test image, the normal
    training images the clean fusion constant comes from). Without training images in cfg.data.roots, the clean
    protocol uses the model's own deployment (pool and fusion constant), as `onenip predict` does: the training images
    are None then."""
    e = cfg.eval
    dep = detector.deployment
    if dep is not None and dep.added_types and e.protocol == "clean":  # their prompts are the deployment's alone
        log.info(f"types added after training ({', '.join(dep.added_types)}): the model's own prompt pool and fusion "
                 "constant are used, as onenip predict uses them")
        return _deployment_pool(detector, cfg), None, None
    try:
        train = prompt_source(detector, cfg)
    except DatasetError as exc:
        dep = detector.deployment
        if e.protocol != "clean" or dep is None:
            raise DatasetError(f"{exc}; the {e.protocol} protocol needs the training images of the evaluated "
                               "categories" + ("" if dep is not None else " (this model carries no prompt pool)")) from None
        warnings.warn(f"no training images to draw prompts from ({exc}): the model's own prompt pool and fusion "
                      "constant are used, as onenip predict uses them", OnenipWarning, stacklevel=3)
        return _deployment_pool(detector, cfg), None, None
    if e.protocol == "clean":  # every deployed model retrieves (one without prompts: for the category's threshold)
        return build_prompt_pool(detector, train, cfg), None, train
    return None, paper_prompt_sets(test, train, e.seed, e.prompts) if detector.uses_prompt else None, train


def _deployment_pool(detector: Detector, cfg: Config) -> PromptPool:
    """The deployment's prompt pool as a PromptPool (its images by path), retrieving by cfg.eval.retrieval."""
    dep = detector.deployment
    samples = [Sample(Path(p), c, 0, "good", None, "train") for p, c in zip(dep.pool_images, dep.pool_categories)]
    return PromptPool(samples, dep.pool_feats.to(next(detector.parameters()).device), cfg.eval.retrieval)


def infer_batches(detector: Detector, cfg: Config, samples: list[Sample], pool: PromptPool | None,
                  prompts: list[list[Sample]] | None, bar: Any) -> Iterator[tuple[np.ndarray, Maps, torch.Tensor,
                                                                                     torch.Tensor, list | None, list | None,
                                                                                     list | None, Any]]:
    """Per batch of `samples`: (their positions, Maps on the device, masks, has_mask, retrieved categories,
    similarities, the type check's (type distance, colour distance, unknown score) for the retrieved category (the
    score over the candidate types the deployed model tries, `scoring.unknown_scores`; None without a deployment),
    and when a retrieved category has a prompt map (added after training, or trained with prompt-map fusion) (the weights of
    each image's learned and prompt maps (B, 2), `Deployment.map_weights`; the prompt maps), else None). The prompts
    are `prompts` (given, per image) or retrieved from `pool`; with eval.prompts = K > 1 the maps are the mean of the
    maps of the K prompts."""
    dep = detector.deployment
    dev = next(detector.parameters()).device
    k_prompts = cfg.eval.prompts if detector.uses_prompt else 1
    check = _type_check(dep, pool, dev) if pool is not None else None  # the product-type check's
    any_prompt = False
    if pool is not None and dep is not None:  # the banks of prompt patches as the deployed model holds them
        banks, rows = (t.to(dev) for t in dep.prompt_banks(pool.kinds))  # row -1: no prompt map
        weights = dep.map_weights(pool.kinds).to(dev)
        any_prompt = bool((rows >= 0).any())
    given = pool.type_indices([s.category for s in samples]) if pool is not None and cfg.eval.given_type else None
    for batch in _loader(SampleImages(samples, cfg.data.input_size, prompts), cfg):
        images = batch["image"].to(dev)
        feats, patches = detector.features_and_patches(images) if any_prompt else (detector.features(images), None)
        prompt_feats: list[torch.Tensor | None] = [None]
        got, sim, dist, prompt = None, None, None, None
        if prompts is not None:  # batch["prompt"]: (B, K, 3, S, S)
            prompt_feats = [detector.features(batch["prompt"][:, k].to(dev)) for k in range(batch["prompt"].shape[1])]
        elif pool is not None:
            j, si = pool.retrieve_top(feats, k_prompts, given[batch["index"].to(given.device)] if given is not None else None)
            if detector.uses_prompt:
                prompt_feats = [pool.feats[j[:, k]] for k in range(j.shape[1])]
            got, sim = [pool.categories[k] for k in j[:, 0].tolist()], si[:, 0].tolist()
            kind = pool.kind[j[:, 0]]
            bank, whitening, limits, colour_limits, (_, r, summed) = check
            tried = pool.candidates(feats, kind, 1 if given is not None else r)  # as DeployModel
            t, c = candidate_distances(feats, colour_column(images, whitening.shape[1] > 3), tried, bank, whitening)
            u = unknown_scores(t, limits[tried], c, colour_limits[tried], summed)
            dist = list(zip(t[:, 0].tolist(), c[:, 0].tolist(), u.tolist())) if dep is not None else \
                [(d, None, None) for d in t[:, 0].tolist()]  # no colour models, no limits: the type distance alone
            own = rows[kind] if any_prompt else None  # each image's bank, -1: none
            if own is not None and bool((own >= 0).any()):  # as the deployed model: the prompt map, weighted
                prompt = (weights[kind], added_type_map(patches, banks, own, detector.extractor.patch_widths,
                                                       cfg.data.input_size))
        bar.update(1)
        yield batch["index"].numpy(), mean_maps([detector.maps(feats, pf) for pf in prompt_feats]), batch["mask"], \
            batch["has_mask"], got, sim, dist, prompt


def _type_check(dep: Deployment | None, pool: PromptPool,
                dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """The product-type check as the deployed model holds it, for the types of `pool` (`pool.kinds`): the banks
    (K, M, C) (`scoring.type_banks`, reduced to coresets as the deployment's are), the colour whitenings (K, D, D + 1),
    the type limits (K,), the colour limits (K,) and `Deployment.unknown_rule`; without a deployment, every patch of
    the pool and no check (zero whitenings, infinite limits, the retrieved type alone)."""
    k = len(pool.kinds)
    if dep is None:
        inf = torch.full((k,), math.inf, device=dev)
        return pool.type_banks(), torch.zeros(k, 3, 4, device=dev), inf, inf, (1.0, 1, False)
    whitening, colour_limits = dep.colour_check(pool.kinds)
    limits = torch.tensor([dep.type_thresholds.get(c, math.inf) for c in pool.kinds], dtype=torch.float32)
    return pool.type_banks(dep.type_coresets), whitening.to(dev), limits.to(dev), colour_limits.to(dev), dep.unknown_rule


def evaluate_category(detector: Detector, cfg: Config, test: list[Sample], indices: list[int], names: list[str],
                      scale: float | None, pool: PromptPool | None, prompts: list[list[Sample]] | None,
                      score_rows: list[dict[str, Any]], bar: Any, clock: dict[str, float]) -> dict[str, Any]:
    """The metrics of one category (its test images at `indices`); fills their score rows and adds the seconds
    spent to clock["inference"] and clock["metrics"]. Its maps are dropped as soon as they are scored."""
    t0 = time.perf_counter()
    e, size, n = cfg.eval, cfg.data.input_size, len(indices)
    has_ref = detector.net.refiner is not None
    maps = {name: np.empty((n, size, size), dtype=np.float32) for name in names}
    masks = np.zeros((n, size, size), dtype=bool)
    has_mask = np.zeros(n, dtype=bool)
    subset = [test[i] for i in indices]
    subset_prompts = [prompts[i] for i in indices] if prompts is not None else None
    for pos, m, mask, hm, got, sim, dist, prompt in infer_batches(detector, cfg, subset, pool, subset_prompts, bar):
        fused = fuse(m.rec, m.ref, e.fusion_alpha, scale) if has_ref else m.rec
        if prompt is not None:  # as `DeployModel`: the weighted sum of the learned and the prompt map
            fused = weigh_maps(fused, prompt[1], prompt[0])
        for name in names:
            maps[name][pos] = {"rec": m.rec, "ref": m.ref, "fused": fused}[name].cpu().numpy()
        masks[pos], has_mask[pos] = mask.numpy(), hm.numpy()
        for p, g, si, (d, c, u) in zip(pos, got or [], sim or [], dist or []):
            score_rows[indices[p]].update(retrieved=g, similarity=round(si, 6), type_distance=round(d, 6),
                                          colour_distance=round(c, 6) if c is not None else None,
                                          unknown_score=round(u, 6) if u is not None else None)
    t1 = time.perf_counter()
    clock["inference"] += t1 - t0
    cat = subset[0].category
    labels = np.array([s.label for s in subset])
    pixel_ok = bool(np.all(has_mask[labels == 1]))
    if not pixel_ok:
        warnings.warn(f"category {cat}: {int(np.sum(~has_mask[labels == 1]))} defective test images have no "
                      "mask; the category is left out of the pixel metrics", OnenipWarning, stacklevel=3)
    entry: dict[str, Any] = {"images": n, "defective": int(labels.sum()), "pixel_metrics": pixel_ok}
    if pool is not None:
        entry["retrieval_accuracy"] = float(np.mean([score_rows[i]["retrieved"] == cat for i in indices]))
    for name in names:
        entry[name], scores = category_metrics(maps[name], masks if pixel_ok else None, labels, cfg)
        for i, sc in zip(indices, scores):
            score_rows[i][f"score_{name}"] = float(sc)
        del maps[name]  # free each map as soon as it is scored
    clock["metrics"] += time.perf_counter() - t1
    return entry


def check_deployed_fusion(detector: Detector, cfg: Config) -> None:
    """Raise ConfigError when cfg.eval.prompt_fusion is not the beta the model's deployment fuses at: the maps judged
    are the deployment's, whose banks, scales and thresholds were set for its beta (a model without deployment, as
    during training, is scored by the learned map)."""
    dep = detector.deployment
    if dep is not None and cfg.eval.prompt_fusion != dep.prompt_fusion:
        raise ConfigError(f"eval.prompt_fusion is {cfg.eval.prompt_fusion:g}, but the model fuses its prompt maps at "
                          f"{dep.prompt_fusion:g}, with thresholds set for that: `onenip calibrate MODEL --prompt-fusion "
                          f"{cfg.eval.prompt_fusion:g} --output NEW` writes a model that fuses at "
                          f"{cfg.eval.prompt_fusion:g}")


@torch.no_grad()
def evaluate(detector: Detector, cfg: Config, progress: bool = True, samples: list[Sample] | None = None,
             skipped: list[tuple[Sample, str]] | None = None) -> Results:
    """Evaluate `detector` on the test split of cfg.data.roots (or on `samples`) under cfg.eval.protocol.

    One category at a time: its maps are computed, scored and dropped before the next, so memory grows with the
    largest category, not with the test set. The paper protocol's fusion constant needs the reconstruction maps of the
    whole test set first: a first pass computes only their minimum and maximum (inference runs twice).
    """
    t_start = time.perf_counter()
    detector.eval()
    e = cfg.eval
    check_deployed_fusion(detector, cfg)
    test, skipped = read_test(detector, cfg, samples, skipped)
    pool, prompts, train = prompt_setup(detector, cfg, test)
    has_ref = detector.net.refiner is not None
    names = [m for m in e.maps if not (m == "ref" and not has_ref)]  # without a refiner, fused is rec
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(test):
        by_cat.setdefault(s.category, []).append(i)
    batches = sum(-(-len(ix) // e.batch_size) for ix in by_cat.values())
    if has_ref and prompts is not None:  # the paper protocol's first pass, over the whole test set at once
        batches += -(-len(test) // e.batch_size)
    bar = progress_bar(total=batches, desc="test", unit="batch", disable=not progress)
    t0 = time.perf_counter()
    if not has_ref:
        scale = None
    elif e.protocol == "clean":
        scale = train_fusion_scale(detector, train, pool, cfg) if train is not None else detector.deployment.fusion_scale
    else:  # paper protocol: (max + min) / 2 over the whole test set (transductive, as the authors' code)
        lo, hi = math.inf, -math.inf
        for _, maps, *_ in infer_batches(detector, cfg, test, pool, prompts, bar):
            lo, hi = min(lo, float(maps.rec.min())), max(hi, float(maps.rec.max()))
        scale = fusion_scale(lo, hi)
    clock = {"inference": time.perf_counter() - t0 if e.protocol == "paper" else 0.0, "metrics": 0.0}
    score_rows: list[dict[str, Any]] = [
        {"image": str(s.image), "category": s.category, "defect": s.defect, "label": s.label, "retrieved": None,
         "similarity": None} for s in test
    ]
    categories = {cat: evaluate_category(detector, cfg, test, by_cat[cat], names, scale, pool, prompts, score_rows, bar,
                                         clock) for cat in sorted(by_cat)}
    bar.close()
    retrieval = float(np.mean([r["retrieved"] == r["category"] for r in score_rows])) if pool is not None else None
    note = why_no_decisions(detector, cfg, pool, scale, names)
    dep = detector.deployment
    decisions = decision_summary(score_rows, dep.thresholds, dep.calibration,
                                 unknown_level=dep.unknown_rule[0]) if note is None else None
    seconds = {"inference": round(clock["inference"], 3), "metrics": round(clock["metrics"], 3),
               "total": round(time.perf_counter() - t_start, 3),
               "images_per_s": round(len(test) / max(clock["inference"], 1e-9), 2)}
    return Results(protocol=e.protocol, categories=categories, fusion_scale=scale, retrieval_accuracy=retrieval,
                   seconds=seconds, scores=score_rows,
                   skipped=[{"image": str(smp.image), "reason": why} for smp, why in skipped],
                   decisions=decisions, decisions_note=note)


def why_no_decisions(detector: Detector, cfg: Config, pool: PromptPool | None, scale: float | None,
                     names: list[str]) -> str | None:
    """None when this evaluation scores what the model's deployment scores (so its thresholds decide as predict
    does); otherwise why not."""
    dep, e = detector.deployment, cfg.eval
    if dep is None:
        return "the model carries no deployment (thresholds)"
    if pool is None:
        return "the paper protocol gives the prompts; the deployed model retrieves them (use the clean protocol)"
    if detector.uses_prompt and e.prompts != 1:
        return f"eval.prompts={e.prompts}: the deployed model uses one prompt"
    if "fused" not in names:
        return "eval.maps has no 'fused' map, the one the deployed model scores"
    if pool.retrieval != detector.cfg.eval.retrieval:
        return (f"eval.retrieval={pool.retrieval}: the deployed model retrieves by {detector.cfg.eval.retrieval} "
                "(the rule it was trained with)")
    if [str(s.image) for s in pool.samples] != list(dep.pool_images):
        return "the prompt pool differs from the deployment's (eval.prompt_pool, eval.seed or the data changed)"
    same_scale = (scale is None) == (dep.fusion_scale is None) and (
        scale is None or math.isclose(scale, dep.fusion_scale, rel_tol=1e-5, abs_tol=1e-12))
    if not same_scale or e.fusion_alpha != dep.alpha or e.score_kernel != dep.score_kernel:
        return "the fusion constant, eval.fusion_alpha or eval.score_kernel differ from the deployment's"
    if not all(math.isfinite(dep.thresholds.get(c, math.inf)) for c in dep.categories):
        return "the deployment has no finite threshold for every category"
    return None


def decision_summary(rows: list[dict[str, Any]], thresholds: dict[str, float], calibration: dict[str, Any] | None = None,
                     type_limits: dict[str, float] | None = None, colour_limits: dict[str, float] | None = None,
                     unknown_level: float | None = None) -> dict[str, Any]:
    """Decide each image (rows of `Results.scores`) as the deployed model does: of an unknown product type when its
    unknown score (`scoring.unknown_scores`, over the types the model tries) exceeds `unknown_level` (then not
    judged), else anomalous when its fused score exceeds the RETRIEVED category's threshold. Without
    `unknown_level`, the rule of models calibrated before it from each row's distances: unknown when its type distance
    or its colour distance exceeds the retrieved category's limit in `type_limits` or `colour_limits` (a distance
    None, or a category without a limit: that half passes). With it, a row whose unknown score is None is known.
    Adds threshold, normalized (1 - 2^(-score / threshold)), known and anomalous to each row; returns the counts per
    true category and in all (an image of an unknown type is neither a false alarm nor a detection: a defective one
    counts as missed), and the pooled metrics of score / threshold."""
    counts: dict[str, dict[str, int]] = {}
    scores = np.array([r["score_fused"] for r in rows], dtype=np.float64)
    t = np.array([thresholds[r["retrieved"]] for r in rows], dtype=np.float64)
    if unknown_level is None:  # the retrieved type alone, each half within its limit (a distance None: 0)
        def half(key: str, limits: dict[str, float] | None) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 1) each
            return (torch.tensor([[r.get(key) or 0.0] for r in rows], dtype=torch.float64),
                    torch.tensor([[(limits or {}).get(r["retrieved"], math.inf)] for r in rows], dtype=torch.float64))
        known = (unknown_scores(*half("type_distance", type_limits), *half("colour_distance", colour_limits),
                                summed=False) <= 1.0).numpy()
    else:
        known = np.array([r.get("unknown_score") is None or r["unknown_score"] <= unknown_level for r in rows],
                         dtype=bool)
    normalized, anomalous = decide(scores, t, known)  # the deployed model's decision
    relative = scores / np.maximum(t, MIN_THRESHOLD)
    for i, r in enumerate(rows):
        r.update(threshold=float(t[i]), normalized=float(normalized[i]), known=bool(known[i]),
                 anomalous=bool(anomalous[i]))
        c = counts.setdefault(r["category"], {"good": 0, "false_alarms": 0, "defective": 0, "missed": 0, "unknown": 0})
        c["unknown"] += not r["known"]
        if r["label"]:
            c["defective"] += 1
            c["missed"] += not r["anomalous"]
        else:
            c["good"] += 1
            c["false_alarms"] += r["anomalous"]
    total = {k: sum(c[k] for c in counts.values()) for k in ("good", "false_alarms", "defective", "missed", "unknown")}
    return {"categories": dict(sorted(counts.items())), "all": total, "thresholds": dict(sorted(thresholds.items())),
            "calibration": calibration or {}, "pooled_relative": image_entry(relative, [r["label"] for r in rows])}


def _null_for_nan(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (JSON's null), in nested dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _null_for_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_null_for_nan(v) for v in obj]
    return obj


def write_results(results: Results, folder: str | Path) -> Path:
    """results.json, results.md (a table per scored map) and scores.csv (one row per test image) in `folder`.

    Results already in the folder are replaced as a whole: their results.json (the file a report reads first) goes
    first and comes back last, so that an interrupted write never leaves new and old files looking like one run; a
    report.html of the earlier results is removed, with a message (it would show results that are gone)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").unlink(missing_ok=True)
    if (folder / "report.html").exists():
        (folder / "report.html").unlink()
        log.warning(f"removed {folder / 'report.html'}: it showed the earlier results in this folder; "
                    f"`onenip report {folder}` makes one of the new results")
    data = results.to_dict()
    if results.checkpoint and Path(results.checkpoint).is_file():  # so that a report can tell the model changed
        data["checkpoint_sha256"] = file_sha256(results.checkpoint)
    md = [f"# Test results ({results.protocol} protocol)", ""]
    if results.retrieval_accuracy is not None:
        md += [f"Prompt retrieval picked the right category for {100 * results.retrieval_accuracy:.2f} % of test images.", ""]
    if results.skipped:
        md += [f"{len(results.skipped)} unusable test files were left out (data.skip_bad); results.json lists them.", ""]
    for name in data["mean"]:
        md += [f"## map: {name}", "", results.to_markdown(name), ""]
    md += ["## Decisions at the model's thresholds (as `onenip predict` decides)", "", results.decisions_markdown(), ""]
    atomic_write_text(folder / "results.md", "\n".join(md))
    if results.scores:
        atomic_write_csv(folder / "scores.csv", results.scores)
    else:
        (folder / "scores.csv").unlink(missing_ok=True)
    # strict JSON: an undefined metric (a category without defective images, say) is null, not NaN
    atomic_write_text(folder / "results.json", json.dumps(_null_for_nan(data), indent=2, allow_nan=False))
    log.info(f"results written to {folder} (results.json, results.md, scores.csv)")
    return folder
