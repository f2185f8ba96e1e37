"""Does fusing the training-free prompt map into the learned map of TRAINED product types help?

A product type added after training (`onenip add-type`) is scored by `onenip.models.scoring.prompt_map`: each query
patch's distance to the nearest patch of the type's prompt images (the frozen backbone's locally aware stride-8
patches, `prompt_distances`), upsampled and smoothed. Prompt-map fusion (`eval.prompt_fusion`, `onenip calibrate
--prompt-fusion BETA`) fuses the same map into the learned map of the types the model WAS trained on:

    map(beta) = (1 - beta) * learned + beta * s_k * prompt

* learned: the model's fused map (alpha * rec + (1 - alpha) * c * ref), exactly as `evaluate` computes it in the clean
  protocol (prompt retrieved from the pool drawn as the deployment's, c from normal training images);
* prompt: the prompt map of the retrieved type's bank of prompt-pool patches;
* s_k: per product type k (applied by the RETRIEVED type, as a deployed model would), from normal TRAINING images
  only: the ratio of the means of the per-image maxima of the two maps over the eval.fusion_images normal training
  images per category that the clean fusion constant uses (the same draw, outside the prompt pool).

Banks and scales are the library's (`onenip.evaluation.calibration.with_prompt_fusion`, what fit and calibrate
build); this script computes each test image's two maps once and scores every beta from them, with the seven metrics
per category through `evaluate.category_metrics` and means over categories as `Results.mean`. Two checks are
recorded: beta = 0 against the model's ordinary `evaluate`, and the deployment built at --deployed BETA (thresholds
and all, as `onenip calibrate --prompt-fusion BETA` builds it) evaluated by `evaluate` against the beta column.

    python benchmarks/prompt_fusion.py --models runs/line-cpu/run --output OUT.json --threads 2

`--combine A.json B.json ...` summarises the models of earlier result files together (one run per model, e.g. as
each finished training), recording each file's command, commit and device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import category_mean, device_name, git_commit, portable  # noqa: E402

from onenip.api import make_config  # noqa: E402
from onenip.checkpoint import atomic_write_text, checkpoint_file  # noqa: E402
from onenip.evaluation.calibration import with_prompt_fusion  # noqa: E402
from onenip.evaluation.evaluate import (  # noqa: E402
    METRICS,
    category_metrics,
    evaluate,
    fusion_samples,
    infer_batches,
    prompt_setup,
    read_test,
    train_fusion_scale,
)
from onenip.logs import progress_bar  # noqa: E402
from onenip.models.detector import Detector, set_threads  # noqa: E402
from onenip.models.prompts import PromptPool  # noqa: E402
from onenip.models.scoring import fuse  # noqa: E402
from onenip.report.page import METRIC_NAMES  # noqa: E402

BETAS = (0.0, 0.1, 0.25, 0.5, 1.0)
NAMES = dict(zip(METRICS, METRIC_NAMES))


@torch.no_grad()
def learned_and_prompt(detector: Detector, cfg, samples, pool: PromptPool, scale: float | None) -> dict[str, Any]:
    """For `samples`: the learned fused map and the prompt map (N, S, S) each, masks, has_mask and the retrieved type
    (the detector's deployment must fuse every trained type: `infer_batches` then yields each image's prompt map)."""
    n, size = len(samples), cfg.data.input_size
    out = {"learned": np.empty((n, size, size), np.float32), "prompt": np.empty((n, size, size), np.float32),
           "masks": np.zeros((n, size, size), bool), "has_mask": np.zeros(n, bool), "retrieved": [None] * n}
    has_ref = detector.net.refiner is not None
    bar = progress_bar(total=0, desc="maps", unit="batch", disable=True)
    for pos, m, mask, hm, got, _sim, _dist, prompt in infer_batches(detector, cfg, samples, pool, None, bar):
        fused = fuse(m.rec, m.ref, cfg.eval.fusion_alpha, scale) if has_ref else m.rec  # as evaluate_category
        assert prompt is not None and bool((prompt[0][:, 1] > 0).all())
        out["learned"][pos] = fused.cpu().numpy()
        out["prompt"][pos] = prompt[1].cpu().numpy()
        out["masks"][pos], out["has_mask"][pos] = mask.numpy(), hm.numpy()
        for p, g in zip(pos, got):
            out["retrieved"][p] = g
    bar.close()
    return out


def max_abs_difference(cats: dict[str, dict[str, float]], ref: dict[str, dict[str, Any]]) -> float:
    """Largest |difference| between the metrics of `cats` and the 'fused' ones of `ref` ({category: {map: metrics}}),
    over the categories of `ref` and the metrics defined there (not None, not nan)."""
    return max(abs(cats[c][m] - r["fused"][m]) for c, r in ref.items() for m in METRICS
               if r["fused"][m] is not None and not math.isnan(r["fused"][m]))


def run_model(path: str, betas: list[float], threads: int, deployed: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    ckpt = checkpoint_file(path, with_training_state=False)
    detector = Detector.load(ckpt).to("cpu").eval()
    if detector.deployment.prompt_fusion:
        raise SystemExit(f"{path} fuses its prompt maps already (beta {detector.deployment.prompt_fusion}); give the "
                         "model without (`onenip calibrate MODEL --prompt-fusion 0 --output NEW`)")
    set_threads(threads)
    cfg = make_config(detector.cfg, ["eval.protocol=clean", "eval.prompts=1", "eval.maps=[fused]"])
    ordinary = evaluate(detector, cfg, progress=False)  # the model's ordinary evaluation (beta = 0 must equal it)
    t_eval = time.perf_counter() - t0

    test, _ = read_test(detector, cfg)
    pool, _, train = prompt_setup(detector, cfg, test)
    scale = train_fusion_scale(detector, train, pool, cfg) if detector.net.refiner is not None else None
    plain = detector.deployment
    both = with_prompt_fusion(detector, plain, pool.samples, fusion_samples(train, pool.samples, cfg), 1.0, cfg)
    detector.deployment = both  # beta 1: infer_batches yields every image's prompt map beside its learned one
    maps = learned_and_prompt(detector, cfg, test, pool, scale)
    detector.deployment = plain
    scales = both.prompt_scales
    s_img = np.array([scales[r] for r in maps["retrieved"]], np.float32)[:, None, None]
    labels_all = np.array([s.label for s in test])
    groups = {}  # per category: its test images' indices, labels and masks (None: not every defective one has one)
    for cat in sorted({s.category for s in test}):
        ix = np.array([i for i, s in enumerate(test) if s.category == cat])
        labels = labels_all[ix]
        pixel_ok = bool(np.all(maps["has_mask"][ix][labels == 1]))  # as evaluate_category
        groups[cat] = (ix, labels, maps["masks"][ix] if pixel_ok else None)
    per_beta: dict[str, Any] = {}
    for beta in betas:
        cats: dict[str, dict[str, float]] = {}
        for cat, (ix, labels, masks) in groups.items():
            amap = (1.0 - beta) * maps["learned"][ix] + beta * s_img[ix] * maps["prompt"][ix]
            cats[cat], _ = category_metrics(amap.astype(np.float32), masks, labels, cfg)
        per_beta[str(beta)] = {"categories": cats, "mean": category_mean(cats)}
    ref = ordinary.categories
    diff = max_abs_difference(per_beta["0.0"]["categories"], ref) if 0.0 in betas else None
    entry = {"model": str(ckpt), "train_seed": detector.cfg.train.seed, "fusion_scale": scale,
             "fusion_scale_ordinary": ordinary.fusion_scale, "prompt_scales": scales,
             "retrieval_accuracy": float(np.mean([r == s.category for r, s in zip(maps["retrieved"], test)])),
             "ordinary": {"categories": {c: v["fused"] for c, v in ref.items()}, "mean": ordinary.mean("fused")},
             "beta0_max_abs_difference": diff, "betas": per_beta}
    if deployed is not None:  # the deployment calibrate builds at this beta, evaluated as `onenip test` evaluates it
        t1 = time.perf_counter()
        detector.deployment = dataclasses.replace(both, prompt_fusion=deployed)
        built = evaluate(detector, make_config(cfg, [f"eval.prompt_fusion={deployed}"]), progress=False)
        detector.deployment = plain
        entry["deployed"] = {"beta": deployed, "mean": built.mean("fused"),
                             "max_abs_difference": max_abs_difference(per_beta[str(deployed)]["categories"],
                                                                      built.categories),
                             "seconds": round(time.perf_counter() - t1, 1)}
    entry["seconds"] = {"ordinary_evaluation": round(t_eval, 1), "total": round(time.perf_counter() - t0, 1)}
    # the same model's evaluation written by ablation.py at training time (clean, K = 1), when it is there
    report = ckpt.parent.parent / f"{ckpt.parent.name}.json"
    if report.is_file():
        ev = [e for e in json.loads(report.read_text())["evaluations"] if e["protocol"] == "clean" and e["prompts"] == 1]
        if ev:
            entry["ablation_json"] = str(report)
            entry["beta0_vs_ablation_json_max_abs_difference"] = max_abs_difference(
                per_beta["0.0"]["categories"], {c: ev[0]["categories"][c] for c in ref}) if 0.0 in betas else None
    return entry


def summarise(models: list[dict[str, Any]], betas: list[float]) -> dict[str, Any]:
    """Per beta, mean and sample std over the models (seeds) of each mean metric, and the paired difference to beta 0."""
    out: dict[str, Any] = {}
    for beta in betas:
        row: dict[str, Any] = {}
        for m in METRICS:
            vals = [e["betas"][str(beta)]["mean"][m] for e in models]
            d = [e["betas"][str(beta)]["mean"][m] - e["betas"][str(betas[0])]["mean"][m] for e in models]
            sd = statistics.stdev if len(vals) > 1 else (lambda v: 0.0)
            row[m] = {"mean": statistics.fmean(vals), "std": sd(vals), "diff_mean": statistics.fmean(d),
                      "diff_std": sd(d)}
        out[str(beta)] = row
    base = out[str(betas[0])]
    for beta in betas[1:]:
        r = out[str(beta)]
        r["verdict"] = {
            "raises_image_auroc": r["image_auroc"]["diff_mean"] > 0,
            "raises_aupro": r["pixel_aupro"]["diff_mean"] > 0,
            "pixel_ap_drop_within_seed_spread": -r["pixel_ap"]["diff_mean"] <= base["pixel_ap"]["std"],
        }
        r["verdict"]["all"] = all(r["verdict"].values())
    return out


def markdown(summary: dict[str, Any], betas: list[float]) -> str:
    head = "| beta | " + " | ".join(NAMES[m] for m in METRICS) + " |"
    lines = [head, "|---|" + "---:|" * len(METRICS)]
    for beta in betas:
        r = summary[str(beta)]
        lines.append(f"| {beta:g} | " + " | ".join(f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['std']:.1f}"
                                                   for m in METRICS) + " |")
    lines += ["", "Paired difference to beta 0 (mean ± std over seeds, points):", "",
              "| beta | " + " | ".join(NAMES[m] for m in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for beta in betas[1:]:
        r = summary[str(beta)]
        lines.append(f"| {beta:g} | " + " | ".join(f"{100 * r[m]['diff_mean']:+.2f} ± {100 * r[m]['diff_std']:.2f}"
                                                   for m in METRICS) + " |")
    return "\n".join(lines)


def combine(paths: list[str], betas: list[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model entries of earlier result files (e.g. one run per model as each finished training), and where each
    file came from (its command, commit, device, torch and threads); refuses a file measured at other betas."""
    models, sources = [], []
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        if earlier["betas"] != betas:
            raise SystemExit(f"{path}: betas {earlier['betas']}, not --betas {betas}")
        models += earlier["models"]
        sources.append({k: earlier[k] for k in ("command", "commit", "device", "torch", "threads")} | {"file": path})
    return models, sources


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--models", nargs="+", help="trained models (model.safetensors or run folders)")
    what.add_argument("--combine", nargs="+", metavar="JSON",
                      help="result files of earlier runs (same betas): their models summarised together")
    ap.add_argument("--betas", type=float, nargs="+", default=list(BETAS), help="fusion weights; the first is the base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deployed", type=float, default=0.25, metavar="BETA",
                    help="also evaluate the deployment built at this beta (one of --betas; default 0.25) and record "
                         "its largest difference to the beta column")
    ap.add_argument("--output", default=str(REPO / "runs" / "prompt-fusion.json"))
    args = ap.parse_args()
    if args.deployed is not None and args.deployed not in args.betas:
        ap.error(f"--deployed {args.deployed} is not among --betas {args.betas}")
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    models, sources = combine(args.combine or [], args.betas)
    for path in args.models or []:
        entry = run_model(path, args.betas, args.threads, args.deployed)
        models.append(entry)
        print(f"{path}: beta0 vs evaluate max |diff| {entry['beta0_max_abs_difference']}, deployed beta "
              f"{args.deployed} vs its column {entry.get('deployed', {}).get('max_abs_difference')}, "
              f"{entry['seconds']['total']} s; " + "; ".join(
                  f"beta {b}: I-AUROC {100 * entry['betas'][str(b)]['mean']['image_auroc']:.2f} "
                  f"P-AP {100 * entry['betas'][str(b)]['mean']['pixel_ap']:.2f} "
                  f"AUPRO {100 * entry['betas'][str(b)]['mean']['pixel_aupro']:.2f}" for b in args.betas), flush=True)
    summary = summarise(models, args.betas)
    table = markdown(summary, args.betas)
    print(table)
    report = {"command": command, "commit": git_commit(),
              "commit_note": "HEAD when the script started; the working tree may hold uncommitted changes by others",
              "device": device_name(torch.device("cpu")), "torch": torch.__version__, "threads": args.threads,
              "betas": args.betas,
              "scale_rule": "onenip.evaluation.calibration.with_prompt_fusion: per type k, mean over eval.fusion_images "
                            "normal training images of category k (the clean fusion constant's draw, outside the prompt "
                            "pool) of max(learned map) / the same of max(prompt map); applied by each test image's "
                            "retrieved type",
              "models": models, "summary": summary, "summary_markdown": table}
    if sources:
        report["combined_from"] = sources
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, portable(json.dumps(report, indent=2, allow_nan=True)))
    print(f"written {out}")


if __name__ == "__main__":
    main()
