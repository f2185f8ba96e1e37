"""Thresholds for a trained detector, and the deployment built after training.

Thresholds come from normal images only — held-out training images, at a false alarm rate the user chooses
(`calibrate_far`) — or, given a labelled validation set, maximise F1 (`calibrate_f1`). `build_deployment` draws the
prompt pool and fusion constant as the clean protocol does and sets the thresholds; `recalibrate` sets new ones.
Prompt-map fusion on trained types (`with_prompt_fusion`: each type's bank and scale) is set up before the thresholds
by both; `add_type` adds a type from a few normal images.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from onenip.data import Sample, group_by_category, load_split, validate_samples
from onenip.data.tensors import SampleImages
from onenip.errors import ConfigError, DatasetError, OnenipWarning
from onenip.evaluation.evaluate import (
    build_prompt_pool,
    features_and_patches_of,
    fusion_samples,
    prompt_source,
    train_fusion_scale,
)
from onenip.evaluation.metrics import f1_max
from onenip.models.deployment import Deployment
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel
from onenip.models.prompts import pool_samples
from onenip.models.scoring import (
    added_type_bank,
    added_type_map,
    banks_by_type,
    colour_stats,
    image_scores,
    patch_distances,
    type_check_bank,
    type_distance,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------------------------


def far_threshold(normal_scores: np.ndarray, far: float) -> float:
    """The smallest threshold at which at most a fraction `far` of these normal scores lie above it.

    With n scores sorted ascending, k = floor(far * n) false alarms are allowed: the threshold is the (n-k)-th score, so
    the scores strictly above it are at most k. With fewer than 1/far scores k = 0: the threshold is the maximum.
    """
    check_far(far)  # every way to a threshold (fit, calibrate, add-type, predict --far) comes here
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no normal scores to set a threshold from")
    k = int(math.floor(far * s.size + 1e-9))
    return float(s[s.size - 1 - k])


def calibrate_far(scores: dict[str, np.ndarray], far: float, source: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-category thresholds at false-alarm rate `far` from normal scores; warns where too few to resolve it."""
    thresholds, info = {}, {}
    for cat, s in scores.items():
        thresholds[cat] = far_threshold(s, far)
        info[cat] = {"method": "false_alarm_rate", "far": far, "normal_images": int(len(s)), "source": source,
                     "normal_scores": sorted(round(float(v), 6) for v in s)}  # for another rate later, without data
        if 0 < far and len(s) * far < 1:  # far = 0 asks for the maximum, which any number of images resolves
            info[cat]["note"] = (f"only {len(s)} normal images: a rate of {far} cannot be resolved; the threshold is "
                                 "their maximum score")
    few = [c for c, v in info.items() if "note" in v]
    if few:
        warnings.warn(f"thresholds of {', '.join(few)} rest on fewer than 1/far = {1 / far:.0f} normal images "
                      f"({source}); their false alarm rate may differ from {far}", OnenipWarning, stacklevel=2)
    return thresholds, info


def calibrate_f1(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-category thresholds maximising F1 on labelled validation scores (anomalous when score > threshold)."""
    thresholds, info = {}, {}
    for cat, s in scores.items():
        lab = labels[cat]
        if lab.min() == lab.max():
            raise DatasetError(f"category {cat}: the validation set needs both normal and defective images for F1")
        best, t = f1_max(s, lab)  # predict anomalous when score >= t
        below = s[s < t]
        # the same decisions with 'score > threshold': the largest score under t (or just under t)
        thresholds[cat] = float(below.max()) if below.size else float(np.nextafter(t, -np.inf))
        info[cat] = {"method": "f1", "f1": float(best), "images": int(len(s)), "defective": int(lab.sum())}
    return thresholds, info


# --------------------------------------------------------------------------------------------------------------------
# Building a deployment after training
# --------------------------------------------------------------------------------------------------------------------


def split_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per category, hold out floor(fraction * n) normal training images (seeded), keeping at least one to train on."""
    if fraction <= 0:
        return list(samples), []
    train, held = [], []
    for c, (cat, members) in enumerate(group_by_category(samples).items()):
        n_hold = min(int(math.floor(fraction * len(members))), len(members) - 1)
        order = np.random.default_rng([seed, c, 0x401D]).permutation(len(members))
        hold = set(order[:n_hold].tolist())
        for i, s in enumerate(members):
            (held if i in hold else train).append(s)
    return train, held


@torch.no_grad()
def deployment_outputs(model: DeployModel, samples: list[Sample], batch_size: int,
                       key: str | Callable[[dict[str, Tensor]], Tensor], workers: int = 0,
                       own_type: bool = False) -> dict[str, np.ndarray]:
    """Output `key` of the deployed model for `samples` (or what `key`, a function of the outputs, makes of them: one
    value per image), grouped by their TRUE category. `own_type`: each image is given its own product type (no
    retrieval)."""
    pick = key if callable(key) else (lambda out: out[key])
    loader = torch.utils.data.DataLoader(SampleImages(samples, model.size), batch_size=batch_size, num_workers=workers)
    dev = model.pool_feats.device
    index = {c: i for i, c in enumerate(model.categories)}
    values: list[np.ndarray] = []
    for b in loader:
        given = torch.tensor([index[samples[i].category] for i in b["index"].tolist()], device=dev) if own_type else None
        values.append(pick(model(b["image"].to(dev), given)).float().cpu().numpy())
    out: dict[str, list[float]] = {}
    for s, v in zip(samples, np.concatenate(values) if values else []):
        out.setdefault(s.category, []).append(float(v))
    return {k: np.array(v) for k, v in out.items()}


def deployment_scores(model: DeployModel, samples: list[Sample], batch_size: int, workers: int = 0) -> dict[str, np.ndarray]:
    """Raw scores of `samples`, grouped by their TRUE category (the one a threshold is for)."""
    return deployment_outputs(model, samples, batch_size, "score", workers)


TYPE_IMAGES = 100  # normal images per category whose type distances set its limit (more cost more inference)


def type_check_images(normal: list[Sample], pool_images: set[str], seed: int) -> list[Sample]:
    """Up to TYPE_IMAGES normal images per category outside the prompt pool: what the unknown-type check's limits and
    colour models are set from."""
    rest = [s for s in normal if str(s.image) not in pool_images]
    return pool_samples(rest, TYPE_IMAGES, seed + 2) if rest else []


def type_limits(model: DeployModel, chosen: list[Sample], margin: float,
                batch_size: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Per category, the limit of the product-type check: `margin` x the largest type distance of its `chosen` normal
    images (`type_check_images`, given their own type). An image farther from every prompt of the type it resembles
    most is of a type the model does not know."""
    dists = deployment_outputs(model, chosen, batch_size, "type_distance", own_type=True)
    limits = {c: float(d.max()) * margin for c, d in dists.items()}
    info = {c: {"type_images": int(len(d)), "type_margin": margin, "largest_type_distance": float(d.max())}
            for c, d in dists.items()}
    return limits, info


COLOUR_KEYS = ("colour_images", "colour_margin", "largest_colour_distance", "colour_texture", "colour_check")  # its
# calibration record
COLOUR_MIN_IMAGES = 10  # normal images a colour model needs (a 4 x 4 covariance from fewer is mostly noise)
COLOUR_SHRINK = 0.05  # each colour's variance grows by this x itself (its own: the intensity, which lighting spreads
# widely, no longer widens the tolerance of the opponent colours, where paper variants differ by a few grey levels) ...
COLOUR_FLOOR = (1.0 / 255) ** 2  # ... and by a grey level squared: a colour's spread is never taken as finer than one
# grey level (grey products' opponent colours are exactly 0; measured against finer floors on iad-mix: see docs)
TEXTURE_FLOOR = 0.01  # the texture contrast's variance grows by this (its log energy read to about 10 %: measured
# against 0.05 on iad-mix, see docs)
TEXTURE_MIN_IMAGES = 20  # normal images a colour model needs to read the texture contrast too: with fewer, a fourth
# dimension inflates the largest leave-one-out distance, and so the colour tolerance (12 generated images: 2x)
COLOUR_MIN_DISTANCE = 1.0  # the limit is margin x at least this (one floor's spread): images whose normal colours
# are alike to the last grey level (generated ones) do not make every other shade unknown


@torch.no_grad()
def colour_stats_of(samples: list[Sample], size: int, batch_size: int) -> dict[str, np.ndarray]:
    """`scoring.colour_stats` of `samples` at the model's input size, with the texture contrast, grouped by category:
    (n, 4) each."""
    loader = torch.utils.data.DataLoader(SampleImages(samples, size), batch_size=batch_size)
    stats = torch.cat([colour_stats(b["image"], texture=True) for b in loader]).numpy() if samples else np.zeros((0, 4))
    out: dict[str, list[np.ndarray]] = {}
    for s, v in zip(samples, stats):
        out.setdefault(s.category, []).append(v)
    return {c: np.stack(v).astype(np.float64) for c, v in out.items()}


def _colour_gaussian(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) colours (and the texture contrast in a fourth column) -> mean (D,) and precision (D, D): the inverse of
    their covariance, each variance grown by COLOUR_SHRINK x itself and COLOUR_FLOOR (the colours) or TEXTURE_FLOOR
    (the texture contrast)."""
    cov = np.cov(stats.T)
    floor = np.array([COLOUR_FLOOR] * 3 + [TEXTURE_FLOOR] * (stats.shape[1] - 3))
    cov = cov + np.diag(COLOUR_SHRINK * np.diag(cov) + floor)
    return stats.mean(axis=0), np.linalg.inv(cov)


def colour_model(stats: np.ndarray, margin: float) -> dict[str, Any] | None:
    """A type's colour model from its normal images' colours (n, D): their mean and precision (`_colour_gaussian`),
    and a limit of `margin` x the largest leave-one-out distance (each image's Mahalanobis distance to the model of
    the others: an image's own model would place it too close), or x COLOUR_MIN_DISTANCE if that is larger. None
    with fewer than COLOUR_MIN_IMAGES images; the colour alone (the first three columns) with fewer than
    TEXTURE_MIN_IMAGES."""
    n = len(stats)
    if n < COLOUR_MIN_IMAGES:
        return None
    if n < TEXTURE_MIN_IMAGES:
        stats = stats[:, :3]
    loo = []
    for i in range(n):
        mean, precision = _colour_gaussian(np.delete(stats, i, axis=0))
        d = stats[i] - mean
        loo.append(float(np.sqrt(max(d @ precision @ d, 0.0))))
    mean, precision = _colour_gaussian(stats)
    return {"mean": mean.tolist(), "precision": precision.tolist(), "limit": margin * max(*loo, COLOUR_MIN_DISTANCE),
            "images": n, "largest_distance": max(loo), "texture": stats.shape[1] > 3}


def colour_models(stats: dict[str, np.ndarray], margin: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per category, `colour_model` of its colours (`colour_stats_of`), and what calibration records about it (a
    category with too few images gets none, and the record says so)."""
    models, info = {}, {}
    for c, v in stats.items():
        m = colour_model(v, margin)
        if m is None:
            info[c] = {"colour_check": f"off: {len(v)} normal images, {COLOUR_MIN_IMAGES} needed"}
            continue
        models[c] = {k: m[k] for k in ("mean", "precision", "limit")}
        info[c] = {"colour_images": m["images"], "colour_margin": margin, "largest_colour_distance": m["largest_distance"],
                   "colour_texture": m["texture"]}
    return models, info


# --------------------------------------------------------------------------------------------------------------------
# Prompt-map fusion on trained types
# --------------------------------------------------------------------------------------------------------------------


def _map_maximum(out: dict[str, Tensor]) -> Tensor:
    return out["map"].flatten(1).amax(dim=1)


@torch.no_grad()
def with_prompt_fusion(detector: Detector, dep: Deployment, pool: list[Sample], normal: list[Sample], beta: float,
                       cfg) -> Deployment:
    """`dep` with prompt-map fusion at `beta` on its trained types: each one's map becomes (1 - beta) x the learned
    map + beta x s_k x its prompt map. Its bank comes from its prompt-pool images `pool` (`scoring.banks_by_type`); s_k brings
    the prompt map to the learned map's scale: the mean of the learned map's per-image maxima over the mean of the
    prompt map's, on the normal training images `normal` of the type (`fusion_samples`, those the fusion constant is
    set on), each judged as the deployed model judges it (by the type it retrieves). A type without such images, or
    whose prompt map is zero on them, is not fused (with a warning). The thresholds are not set here: they must be
    set on the fused maps after it."""
    pool = [s for s in pool if s.category not in dep.added_types]
    patches = features_and_patches_of(detector, pool, cfg)[1].cpu()  # (P, C', G, G)
    banks = banks_by_type(patches, [s.category for s in pool])  # as an added type's from its K prompt images
    probe = dataclasses.replace(dep, prompt_patches={**dep.prompt_patches, **banks},
                                prompt_scales={t: 1.0 for t in banks})
    dev = dep.pool_feats.device
    normal = [s for s in normal if s.category in banks]
    maxima = [deployment_outputs(DeployModel(detector, dataclasses.replace(probe, prompt_fusion=b)).to(dev), normal,
                                 cfg.eval.batch_size, _map_maximum) for b in (0.0, 1.0)]  # the learned, the prompt map
    scales, left = {}, []
    for t in banks:
        learned, prompt = (float(np.mean(m[t])) if len(m.get(t, [])) else 0.0 for m in maxima)
        if prompt > 0 and learned > 0:
            scales[t] = learned / prompt
        else:
            left.append(t)
    if left:
        warnings.warn(f"prompt-map fusion leaves out {', '.join(left)}: no normal training images outside the prompt "
                      "pool to set its scale on, or a map that is zero on them; their learned map stays alone",
                      OnenipWarning, stacklevel=2)
    return dataclasses.replace(dep, prompt_fusion=beta, prompt_scales=scales,
                               prompt_patches={**dep.prompt_patches, **{t: banks[t] for t in scales}})


def check_prompt_fusion(beta: float | None) -> None:
    """Raise ConfigError unless prompt-map fusion's beta (None: not given) is in [0, 1], checked before a model is
    loaded (`onenip.api.calibrate`) and by `recalibrate`."""
    if beta is not None and not 0 <= beta <= 1:
        raise ConfigError(f"--prompt-fusion (the prompt map's weight) must be in [0, 1] (0: the learned map alone), "
                          f"got {beta}")


def set_prompt_fusion(detector: Detector, dep: Deployment, beta: float, skip_bad: bool = False) -> Deployment:
    """`dep` fusing its trained types' prompt maps at `beta` (`with_prompt_fusion`), for `recalibrate`: 0 drops their
    banks and scales; a model that has them for every trained type only changes beta; otherwise they are built from
    its prompt-pool images and its training images (both must be readable: a DatasetError names what is not)."""
    trained = [t for t in dep.categories if t not in dep.added_types]
    if beta == 0:
        return dataclasses.replace(dep, prompt_fusion=0.0, prompt_scales={},
                                   prompt_patches={t: p for t, p in dep.prompt_patches.items() if t in dep.added_types})
    if all(t in dep.prompt_patches and t in dep.prompt_scales for t in trained):
        return dataclasses.replace(dep, prompt_fusion=beta)
    cfg = dataclasses.replace(detector.cfg, data=dataclasses.replace(detector.cfg.data, skip_bad=skip_bad))
    pool = [Sample(Path(p), c, 0, "good", None, "train") for p, c in zip(dep.pool_images, dep.pool_categories)
            if c in trained]
    missing = [str(s.image) for s in pool if not s.image.is_file()]
    if missing:
        raise DatasetError(f"prompt-map fusion needs the model's prompt-pool images, and {len(missing)} of them are "
                           f"not there: {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    try:
        train = prompt_source(detector, cfg)
    except DatasetError as exc:
        raise DatasetError(f"prompt-map fusion sets its scales on the model's training images, which cannot be read: "
                           f"{exc}") from None
    return with_prompt_fusion(detector, dep, pool, fusion_samples(train, pool, cfg), beta, cfg)


# --------------------------------------------------------------------------------------------------------------------
# The deployment built after training
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_deployment(detector: Detector, train: list[Sample], holdout: list[Sample], far: float,
                     cfg=None) -> Deployment:
    """Prompt pool and fusion constant from training images, with prompt-map fusion when cfg.eval.prompt_fusion > 0
    (`with_prompt_fusion`); thresholds at false-alarm rate `far` from the held-out normal images (from the training
    images themselves, with a warning, for categories without held-out images)."""
    cfg = cfg or detector.cfg
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, prompts=1))  # DeployModel uses the best prompt
    detector.eval()
    pool = build_prompt_pool(detector, train, cfg)
    scale = train_fusion_scale(detector, train, pool, cfg) if detector.net.refiner is not None else None
    dep = Deployment(
        pool_feats=pool.feats, pool_categories=pool.categories, pool_images=[str(s.image) for s in pool.samples],
        fusion_scale=scale, thresholds={c: math.inf for c in set(pool.categories)},
        alpha=cfg.eval.fusion_alpha, score_kernel=cfg.eval.score_kernel,
        unknown_level=cfg.eval.unknown_level, unknown_candidates=cfg.eval.unknown_candidates, type_coresets=True,
    )
    if cfg.eval.prompt_fusion > 0:  # before the thresholds, which are set on the fused maps
        dep = with_prompt_fusion(detector, dep, pool.samples, fusion_samples(train, pool.samples, cfg),
                                 cfg.eval.prompt_fusion, cfg)
    model = DeployModel(detector, dep).to(pool.feats.device)
    held_cats = {s.category for s in holdout}
    missing = sorted(set(pool.categories) - held_cats)
    scores = deployment_scores(model, holdout, cfg.eval.batch_size)
    thresholds, info = calibrate_far(scores, far, "held-out training images") if scores else ({}, {})
    if missing:
        warnings.warn(f"no held-out normal images for {', '.join(missing)}: their thresholds come from training "
                      "images, whose scores are lower than new images' (expect more false alarms); more normal images, "
                      "or data.holdout > 0, give held-out ones", OnenipWarning, stacklevel=2)
        fallback = deployment_scores(model, [s for s in train if s.category in missing], cfg.eval.batch_size)
        t2, i2 = calibrate_far(fallback, far, "training images, none held out")
        thresholds.update(t2)
        info.update(i2)
    chosen = type_check_images(train + holdout, set(dep.pool_images), cfg.eval.seed)
    if cfg.eval.unknown_margin > 0:
        dep.type_thresholds, type_info = type_limits(model, chosen, cfg.eval.unknown_margin, cfg.eval.batch_size)
        for c, v in type_info.items():
            info.setdefault(c, {}).update(v)
    if cfg.eval.colour_margin > 0:
        dep.colour_models, colour_info = colour_models(colour_stats_of(chosen, model.size, cfg.eval.batch_size),
                                                       cfg.eval.colour_margin)
        for c, v in colour_info.items():
            info.setdefault(c, {}).update(v)
    dep.thresholds, dep.calibration = thresholds, info
    return dep


def check_far(far: float | None) -> None:
    """Raise ConfigError unless `far` (a false alarm rate; None: not given) is in [0, 1): what `far_threshold` needs,
    checked early too, before a model is loaded and images are scored (`check_one_method`, `onenip.api.add_type`)."""
    if far is not None and not 0 <= far < 1:
        raise ConfigError(f"--far (a false alarm rate) must be in [0, 1), got {far}")


def check_colour_margin(margin: float | None) -> None:
    """Raise ConfigError unless the colour check's margin (None: not given) is >= 0, checked before a model is loaded
    (`onenip.api.calibrate`) and by `recalibrate`."""
    if margin is not None and not margin >= 0:
        raise ConfigError(f"--colour-margin must be >= 0 (0 turns the colour check off), got {margin}")


def check_one_method(far: float | None, val_roots: Sequence[str | Path] | None) -> None:
    """Raise ConfigError when the false alarm rate is out of range, or when both it and a validation set are given:
    they set thresholds in two different ways, and neither is silently ignored. `recalibrate` checks it;
    `onenip.api.calibrate` before it loads the model."""
    check_far(far)
    if far is not None and val_roots:
        raise ConfigError(
            "--far and --val set thresholds in two different ways; give one of them (given: --far "
            f"{far} and --val {' '.join(map(str, val_roots))}). --far RATE puts each category's threshold where at most "
            "that fraction of the normal images held out of training scores above it; --val ROOT makes it F1-optimal "
            "on a labelled folder of normal and defective images (the model's eval.far is used when neither is given).")


@torch.no_grad()
def recalibrate(detector: Detector, far: float | None = None, val_roots: Sequence[str | Path] | None = None,
                skip_bad: bool = False, colour_margin: float | None = None,
                prompt_fusion: float | None = None) -> Deployment:
    """New thresholds for a trained model: F1-optimal on a labelled validation set (`val_roots`, read like test data:
    normal and defective images), or at false-alarm rate `far` (default: the model's eval.far) on the images held out
    of its training. The two are different methods: giving both is a ConfigError (`check_one_method`), not one of them
    ignored.

    Each recalibrated category's `calibration` entry says how its threshold was set and on how many images
    (``normal_images`` for a false alarm rate; ``images`` and ``defective`` for F1); a category without calibration
    images keeps its threshold and entry (with a warning). A model built before the colour half of the type check
    gains it here (`colour_models` from its training images, as `fit` builds them) when its eval.colour_margin is
    above 0. `colour_margin` sets the colour check's margin instead: 0 turns it off, another value rescales every
    type's limit to it (the limit is margin x a distance of the type's own images), building the models first for a
    model without them. A model calibrated before the summed rule of the type check gains it and the check's
    coreset banks, its type limits set again on them (`_with_summed_rule`). `prompt_fusion` sets prompt-map
    fusion on the trained types at that beta (0: off; `set_prompt_fusion`) before the thresholds, which are then set
    on the new maps."""
    check_colour_margin(colour_margin)
    check_prompt_fusion(prompt_fusion)
    check_one_method(far, val_roots)
    cfg = detector.cfg
    dep = detector.deployment
    # the training split, listed (and its images checked) once, by whatever below needs it
    training = functools.cache(lambda: load_split(cfg.data.roots, "train", cfg.data.categories or None, skip_bad)[0])
    if dep is None:  # an older checkpoint: build the pool and fusion constant from its training data
        train, _ = split_holdout(training(), cfg.data.holdout, cfg.train.seed)
        dep = build_deployment(detector, train, [], cfg.eval.far if far is None else far)
    fusion_before = dep.prompt_fusion
    if prompt_fusion is not None and prompt_fusion != dep.prompt_fusion:
        dep = set_prompt_fusion(detector, dep, prompt_fusion, skip_bad)
    # the trained types' maps changed: the held-out scores their old calibration kept are of another map
    stale = {c for c in dep.categories if c not in dep.added_types} if dep.prompt_fusion != fusion_before else set()
    model = DeployModel(detector, dep).to(dep.pool_feats.device)
    if val_roots:
        val, _ = load_split([str(r) for r in val_roots], "test", None, skip_bad, labelled_only=True)  # no train/ needed
        unknown = sorted({s.category for s in val} - set(dep.categories))
        if unknown:
            raise DatasetError(f"validation categories {', '.join(unknown)} are not among the model's: "
                             f"{', '.join(dep.categories)}")
        scores = deployment_scores(model, val, cfg.eval.batch_size)
        labels: dict[str, list[int]] = {}
        for s in val:
            labels.setdefault(s.category, []).append(s.label)
        thresholds, info = calibrate_f1(scores, {k: np.array(v) for k, v in labels.items()})
    else:
        held = [Path(p) for p in detector.extra.get("holdout", [])]
        if not held:
            raise ConfigError("this model kept no held-out normal images (data.holdout was 0): give a labelled "
                             "validation folder (--val) or retrain with data.holdout > 0")
        by_path = {}
        for s in training():
            by_path[s.image] = s
        samples = [by_path[p] for p in held if p in by_path]
        if len(samples) < len(held):
            warnings.warn(f"{len(held) - len(samples)} held-out images are no longer in the training data", OnenipWarning,
                          stacklevel=2)
        far = cfg.eval.far if far is None else far
        thresholds, info = calibrate_far(deployment_scores(model, samples, cfg.eval.batch_size), far,
                                         "held-out training images")
    kept = {c: dep.thresholds[c] for c in dep.categories if c not in thresholds}
    if kept:
        moved = sorted(set(kept) & stale)
        warnings.warn(f"no calibration images for {', '.join(sorted(kept))}: their thresholds are unchanged"
                      + (f" (for {', '.join(moved)} set on the map before prompt-map fusion changed from "
                         f"{fusion_before:g} to {dep.prompt_fusion:g}: recalibrate them with --val)" if moved else ""),
                      OnenipWarning, stacklevel=2)
    # the type check is not recalibrated; the held-out normal scores stay for another false-alarm rate later (new ones
    # replace them; after the map changed, old ones are dropped), and an added type keeps the list of its images
    type_keys = ("type_images", "type_margin", "largest_type_distance", "normal_scores", "added_from", *COLOUR_KEYS)

    def carried(c: str, keys: Sequence[str]) -> dict[str, Any]:  # copies: `dep` stays as it was
        old = dep.calibration.get(c, {})
        return {k: old[k] for k in keys if k in old and not (k == "normal_scores" and c in stale)}

    for c, v in info.items():
        v.update({k: x for k, x in carried(c, type_keys).items() if k not in v})
    calibration = {**{c: carried(c, list(dep.calibration.get(c, {}))) for c in kept}, **info}
    colours, colour_info = _colour_check(dep, cfg, colour_margin, training)
    for c, v in colour_info.items():  # a rescaled margin keeps the record; a new model or none replaces it
        old = calibration.get(c, {})
        calibration[c] = {**(old if set(v) == {"colour_margin"} else
                             {k: x for k, x in old.items() if k not in COLOUR_KEYS}), **v}
    # everything else (the pool, added types and their patches, type limits) as it was ...
    new = dataclasses.replace(dep, thresholds={**kept, **thresholds}, calibration=calibration, colour_models=colours)
    # ... but a model calibrated before the summed rule gains it, as fit builds it now
    return _with_summed_rule(detector, new, training) if dep.unknown_level is None else new


def _type_check_images_of(dep: Deployment, cfg, training: Callable[[], list[Sample]]) -> tuple[list[Sample], str | None]:
    """The trained types' normal training images (`training()`, the split) that `build_deployment` sets the type
    limits and colour models from (`type_check_images`), and None; or ([], why) when they cannot be read."""
    try:
        normal = training()
    except (DatasetError, OSError) as exc:
        return [], f"its training images cannot be read ({exc})"
    trained = set(dep.categories) - set(dep.added_types)
    return type_check_images([s for s in normal if s.category in trained], set(dep.pool_images), cfg.eval.seed), None


def _with_summed_rule(detector: Detector, dep: Deployment, training: Callable[[], list[Sample]]) -> Deployment:
    """`dep` (a model calibrated before the summed rule) with the unknown-type check fit builds now: the rule of its
    eval.unknown_level and eval.unknown_candidates, and the coreset banks (`Deployment.type_coresets`) with each
    trained type's limit set again on them (eval.unknown_margin x the largest type distance of up to TYPE_IMAGES of
    its normal training images outside the pool, as fit sets it). A model with added types, or whose training images
    cannot be read, keeps every patch and its limits (the rule alone changes), with a message."""
    cfg = detector.cfg
    dep = dataclasses.replace(dep, unknown_level=cfg.eval.unknown_level, unknown_candidates=cfg.eval.unknown_candidates)
    how = (f"the unknown-type check now tries the {cfg.eval.unknown_candidates} most similar product types and sums "
           f"each one's two distances as fractions of their limits, unknown above {cfg.eval.unknown_level:g} (this "
           "model judged the retrieved type alone, unknown when either distance exceeded its limit)")
    if not dep.type_thresholds:  # no type limits to set again
        log.info(how)
        return dataclasses.replace(dep, type_coresets=True)
    chosen, why = ([], "its added types' limits were set on their own images") if dep.added_types else \
        _type_check_images_of(dep, cfg, training)
    if not chosen:
        log.info(f"{how}; it keeps comparing every prompt patch, with its limits, since "
                 f"{why or 'no normal training images lie outside its prompt pool'}")
        return dep
    dep = dataclasses.replace(dep, type_coresets=True)
    model = DeployModel(detector, dep).to(dep.pool_feats.device)
    limits, info = type_limits(model, chosen, cfg.eval.unknown_margin, cfg.eval.batch_size)
    log.info(f"{how}; it compares a k-center coreset of each type's prompt patches, its type limits set again on "
             f"{len(chosen)} normal training images")
    calibration = {c: {**dep.calibration.get(c, {}), **info.get(c, {})} for c in [*dep.calibration, *info]}
    return dataclasses.replace(dep, type_thresholds={**dep.type_thresholds, **limits}, calibration=calibration)


def _colour_check(dep: Deployment, cfg, margin: float | None,
                  training: Callable[[], list[Sample]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """`recalibrate`'s colour models and what changes in the calibration records: the model's own (None), none (0),
    or its own with every limit rescaled to `margin`; built from the training images where the model has none."""
    if margin is None:
        if dep.colour_models or cfg.eval.colour_margin <= 0:
            return dep.colour_models, {}
        margin = cfg.eval.colour_margin  # a model built before the colour check gains one
    if margin == 0:
        return {}, {c: {"colour_check": "off: turned off by calibrate"} for c in dep.colour_models}
    if not dep.colour_models:
        return _colour_models_of_training(dep, cfg, training, margin)
    models, info = {}, {}
    for c, m in dep.colour_models.items():
        old = float(dep.calibration.get(c, {}).get("colour_margin", cfg.eval.colour_margin))
        models[c] = {**m, "limit": m["limit"] * margin / old}
        info[c] = {"colour_margin": margin}
    return models, info


def _colour_models_of_training(dep: Deployment, cfg, training: Callable[[], list[Sample]],
                               margin: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The colour models `build_deployment` would have built, from the model's training images (the same ones its type
    limits are drawn from), for a model built before the colour check; none, with a warning, when they cannot be read."""
    chosen, why = _type_check_images_of(dep, cfg, training)
    if why is not None:
        warnings.warn(f"the colour check is not added: {why}", OnenipWarning, stacklevel=3)
        return {}, {}
    return colour_models(colour_stats_of(chosen, cfg.data.input_size, cfg.eval.batch_size), margin)


# --------------------------------------------------------------------------------------------------------------------
# A product type added after training
# --------------------------------------------------------------------------------------------------------------------

THRESHOLD_FOLDS = 4  # without further normal images, the K prompt images are scored in this many folds (K <= 4:
# each against the other K - 1), each fold against the bank of the others: one coreset per fold, whatever K
SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # of a lone prompt image, by a quarter of a feature cell, for its threshold


@torch.no_grad()
def add_type(detector: Detector, name: str, images: Sequence[str | Path], normal: Sequence[str | Path] = (),
             far: float | None = None, margin: float | None = None, skip_bad: bool = False,
             replace: bool = False) -> Deployment:
    """The detector's deployment with the product type `name` added from K >= 1 normal `images`, with no gradient
    step: the K images join the prompt pool (so retrieval can find the type), the type is scored by the training-free
    prompt map (`onenip.models.scoring.prompt_map`: each patch's distance to the nearest patch of its prompt images,
    kept as a bank of at most max(one image's, a quarter of all) patches, `scoring.added_type_bank`), and it gets a
    threshold and a limit for the unknown-type check.

    The threshold is set at false alarm rate `far` (default eval.far) on the scores of `normal`, further normal images
    of the type, when given; otherwise on the K images themselves, each scored against the bank of the others
    (leave one out up to K = 4; beyond, THRESHOLD_FOLDS folds, each fold against the bank of the rest; with K = 1,
    four copies of the image shifted by a quarter of a feature cell stand in). The type
    limit is `margin` (default eval.unknown_margin) x the largest type distance of the same images; the colour model
    (`colour_model`, eval.colour_margin) comes from the K images and `normal` together, when they are at least
    COLOUR_MIN_IMAGES (else the type has no colour check, and its calibration record says so). `replace`: `name`
    is a type added before, whose prompts, threshold and limit are replaced (a trained type cannot be).

    Raises:
        ConfigError: an empty name, a name the model has already (without `replace`), `replace` of a name that is not
            an added type, no images, a model without deployment.
        DatasetError: an image that cannot be read (naming it).
    """
    cfg, dep = detector.cfg, detector.deployment
    if dep is None:
        raise ConfigError("this model has no deployment (a training checkpoint?): add a type to its model.safetensors")
    name = name.strip()
    if not name:
        raise ConfigError("--name: give the new product type a name")
    if replace and name not in dep.added_types:
        kind = "a trained type, which cannot be replaced" if name in dep.categories else "not a type of the model"
        raise ConfigError(f"--replace --name {name!r}: {kind} (added types: {', '.join(dep.added_types) or 'none'})")
    if name in dep.categories and not replace:
        raise ConfigError(f"--name {name!r}: the model has this product type already (types: {', '.join(dep.categories)}); "
                          "choose another name, or --replace an added type")
    if not images:
        raise ConfigError("give at least one normal image of the new type")
    far = cfg.eval.far if far is None else far
    margin = cfg.eval.unknown_margin if margin is None else margin
    prompts = _type_samples(images, name, skip_bad)
    extra = _type_samples(normal, name, skip_bad) if normal else []
    if replace:
        dep = _without_type(dep, name)
    detector.eval()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=0))  # a few images: no worker processes
    if len(prompts) == 1:  # its pixels are needed below as well: decoded once
        pixels = SampleImages(prompts, detector.input_size)[0]["image"][None].to(next(detector.parameters()).device)
        feats, patches = detector.features_and_patches(pixels)
    else:
        feats, patches = features_and_patches_of(detector, prompts, cfg)  # (K, C, H, W), (K, C', 2H, 2W)
    size, kernel, widths = detector.input_size, dep.score_kernel, detector.extractor.patch_widths
    bank = added_type_bank(patches)  # what the deployed model compares with
    if extra:
        scores, dists = prompt_scores(*features_and_patches_of(detector, extra, cfg), feats, bank, widths, size, kernel,
                                      dep.type_coresets)
        source = f"{len(extra)} further normal images"
    elif len(prompts) > 1:  # each fold of images against the bank of the others: one coreset per fold
        folds = [list(range(f, len(prompts), THRESHOLD_FOLDS)) for f in range(min(THRESHOLD_FOLDS, len(prompts)))]
        pairs = []
        for held in folds:
            rest = [i for i in range(len(prompts)) if i not in held]
            pairs.append(prompt_scores(feats[held], patches[held], feats[rest], added_type_bank(patches[rest]), widths,
                                       size, kernel, dep.type_coresets))
        scores, dists = (np.concatenate(v) for v in zip(*pairs))
        source = f"the {len(prompts)} prompt images, each against the others" if len(folds) == len(prompts) else \
            f"the {len(prompts)} prompt images in {len(folds)} folds, each against the other folds"
    else:
        step = max(1, size // 64)  # a quarter of a 16-pixel feature cell
        padded = torch.nn.functional.pad(pixels.float(), (step, step, step, step), mode="reflect").to(torch.uint8)
        shifted = torch.cat([padded[:, :, step + dy * step : step + dy * step + size, step + dx * step : step + dx * step + size]
                             for dx, dy in SHIFTS])
        scores, dists = prompt_scores(*detector.features_and_patches(shifted), feats, bank, widths, size, kernel,
                                      dep.type_coresets)
        source = "4 shifted copies of the single prompt image"
    thresholds, info = calibrate_far({name: scores}, far, source)
    info[name].update(type_images=int(len(dists)), type_margin=margin, largest_type_distance=float(np.max(dists)),
                      added_from=[str(s.image) for s in prompts])
    colours: dict[str, dict[str, Any]] = {}
    if cfg.eval.colour_margin > 0:  # from all its normal images: the prompts and the further ones
        colours, colour_info = colour_models(colour_stats_of(prompts + extra, size, cfg.eval.batch_size),
                                             cfg.eval.colour_margin)
        info[name].update(colour_info.get(name, {}))
    return dataclasses.replace(
        dep, pool_feats=torch.cat([dep.pool_feats, feats.cpu()]), pool_categories=dep.pool_categories + [name] * len(prompts),
        pool_images=dep.pool_images + [str(s.image) for s in prompts],
        thresholds={**dep.thresholds, name: thresholds[name]}, calibration={**dep.calibration, **info},
        added_types=dep.added_types + [name], prompt_patches={**dep.prompt_patches, name: bank.cpu()},
        type_thresholds={**dep.type_thresholds, name: float(np.max(dists)) * margin if margin > 0 else math.inf},
        colour_models={**dep.colour_models, **colours})


def _without_type(dep: Deployment, name: str) -> Deployment:
    """`dep` without the added type `name`: its pool entries, patches, threshold, calibration and limit."""
    keep = [i for i, c in enumerate(dep.pool_categories) if c != name]
    return dataclasses.replace(
        dep, pool_feats=dep.pool_feats[keep], pool_categories=[dep.pool_categories[i] for i in keep],
        pool_images=[dep.pool_images[i] for i in keep], added_types=[t for t in dep.added_types if t != name],
        prompt_patches={t: p for t, p in dep.prompt_patches.items() if t != name},
        thresholds={c: t for c, t in dep.thresholds.items() if c != name},
        calibration={c: v for c, v in dep.calibration.items() if c != name},
        type_thresholds={c: t for c, t in dep.type_thresholds.items() if c != name},
        colour_models={c: m for c, m in dep.colour_models.items() if c != name})


SCORE_CHUNK = 8  # images scored at once by `prompt_scores`: bounds its memory whatever the number of images


def prompt_scores(feats: Tensor, patches: Tensor, prompt_feats: Tensor, bank: Tensor, widths: list[int],
                  size: int, kernel: int, reduced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and type distances of images (features (N, C, H, W) and patches (N, C', 2H, 2W)) judged as a type
    added from prompt images with `prompt_feats` (P, C, H, W) and the bank of their patches (M, C',
    `scoring.added_type_bank`): what the deployed model computes for them (`widths`: the patches' taps,
    `FeatureExtractor.patch_widths`; `reduced`: the type check's bank is a coreset, `Deployment.type_coresets`),
    SCORE_CHUNK at a time."""
    types = type_check_bank(prompt_feats, reduced)
    scores, dists = [], []
    for f, p in zip(feats.split(SCORE_CHUNK), patches.split(SCORE_CHUNK)):
        own = torch.zeros(len(p), dtype=torch.int64, device=p.device)  # every image against the one bank
        scores.append(image_scores(added_type_map(p, bank[None], own, widths, size), kernel))
        dists.append(type_distance(patch_distances(f, types[None].expand(len(f), -1, -1))))
    return torch.cat(scores).cpu().numpy(), torch.cat(dists).cpu().numpy()


def _type_samples(paths: Sequence[str | Path], name: str, skip_bad: bool) -> list[Sample]:
    """Normal images of a new type as samples, each decoded once (an unreadable one is named, or with skip_bad left
    out with a warning)."""
    samples = [Sample(Path(p).expanduser().absolute(), name, 0, "good", None, "train") for p in paths]
    good, bad = validate_samples(samples, skip_bad=skip_bad)
    if not good:
        raise DatasetError(f"none of the {len(samples)} images of {name!r} can be read")
    return good
