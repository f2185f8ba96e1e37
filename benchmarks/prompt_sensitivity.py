"""Does a trained model use its prompt? The same test images, scored with different prompts.

    python benchmarks/prompt_sensitivity.py runs/abl128/cpu128-row2-seed1 runs/abl128/cpu128-row5-seed1
    python benchmarks/prompt_sensitivity.py RUN --data .devdata/iad-mix      # a run trained elsewhere, data moved

Table 4a's rows 1, 2, 4 and 5 differ from UniAD by a prompt; if a trained model's maps hardly change when its prompt
does, the rows cannot differ through it. For each run folder (model.safetensors of `onenip fit` or ablation.py) every
test image is scored with each of these prompts:

* same:  a random normal training image of its own category (the paper protocol's draw, eval.seed);
* other: a random normal training image of another category (seeded);
* self:  the test image itself (an anomalous query then "explains" its own anomaly: the identical shortcut);
* gray:  a uniform mid-gray image (no information at all).

Per prompt it prints the mean over categories of the seven metrics of the reconstruction map (`rec`, no fusion) and
of the refiner's map (`ref`) when there is one, and how far the maps move from those of `same`: the mean absolute
difference over all pixels relative to the mean of the `same` map. Writes prompt-sensitivity.json to --output.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_runs import KEYS, NAMES  # noqa: E402
from iad_mix import category_mean, device_name, git_commit, portable  # noqa: E402

from onenip.checkpoint import atomic_write_text  # noqa: E402
from onenip.config import Config  # noqa: E402
from onenip.data import group_by_category, load_split  # noqa: E402
from onenip.data.images import read_sample  # noqa: E402
from onenip.evaluation.evaluate import category_metrics, features_of, prompt_source  # noqa: E402
from onenip.models.detector import Detector, resolve_device  # noqa: E402
from onenip.models.prompts import paper_prompts  # noqa: E402

MODES = ("same", "other", "self", "gray")


def other_prompts(test: list, train: list, seed: int) -> list:
    """For each test sample, a random training sample of another category (seeded by (seed, index))."""
    by_cat = group_by_category(train)
    out = []
    for i, s in enumerate(test):
        pool = [m for c, ms in by_cat.items() if c != s.category for m in ms]
        if not pool:
            raise ValueError("the 'other' prompt needs at least two categories")
        out.append(pool[int(np.random.default_rng([seed, i, 0x07]).integers(len(pool)))])
    return out


def sensitivity(run: Path, data: list[str] | None, device: torch.device, seed: int) -> dict:
    """`sensitivity_of` the model saved in the run folder `run` (model.safetensors); `data` replaces data.roots."""
    det = Detector.load(run / "model.safetensors").to(device).eval()
    if not det.uses_prompt:
        raise SystemExit(f"{run}: the model takes no prompt (model.arch={det.cfg.model.arch})")
    if data:
        det.cfg.data.roots = data
    return {"run": str(run), **sensitivity_of(det, det.cfg, device, seed)}


@torch.no_grad()
def sensitivity_of(det: Detector, cfg: Config, device: torch.device, seed: int) -> dict:
    """Metrics of the rec (and ref) maps of the test split of cfg.data with each prompt of MODES, and how far each
    moves the maps from those of `same`: {arch, input_size, test_images, modes: {mode: {map: {mean, categories,
    relative_change}}}}."""
    det.eval()
    cats = cfg.data.categories or None
    test, _ = load_split(cfg.data.roots, "test", cats)
    train = prompt_source(det, cfg)  # as evaluate(): the model's categories, less its held-out images
    feats = features_of(det, test, cfg)  # (N, C, h, w)
    index = {s.image: i for i, s in enumerate(train)}
    chosen = {"same": paper_prompts(test, train, seed), "other": other_prompts(test, train, seed)}
    needed = sorted({index[s.image] for ps in chosen.values() for s in ps})
    train_feats = dict(zip(needed, features_of(det, [train[i] for i in needed], cfg)))
    size = cfg.data.input_size
    gray = det.features(torch.full((1, 3, size, size), 128, dtype=torch.uint8, device=device))  # (1, C, h, w)
    names = ["rec", "ref"] if det.net.refiner is not None else ["rec"]
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(test):
        by_cat.setdefault(s.category, []).append(i)
    per_mode = {m: {n: {} for n in names} for m in MODES}
    moved = {m: {n: [0.0, 0.0] for n in names} for m in MODES}  # sum |map - same map|, sum same map
    for cat, idx in sorted(by_cat.items()):
        masks = [read_sample(test[i], size)[1] for i in idx]
        labels = np.array([test[i].label for i in idx])
        # as evaluate(): a category with a defective image lacking its mask is left out of the pixel metrics
        pixel_ok = all(m is not None for m, y in zip(masks, labels) if y == 1)
        truth = np.stack([m if m is not None else np.zeros((size, size), dtype=bool) for m in masks]) if pixel_ok else None
        q = feats[idx].to(device)
        maps = {}
        for mode in MODES:
            if mode in chosen:
                p = torch.stack([train_feats[index[chosen[mode][i].image]] for i in idx]).to(device)
            elif mode == "self":
                p = q
            else:
                p = gray.expand_as(q)
            out = [det.maps(q[s : s + 32], p[s : s + 32]) for s in range(0, len(idx), 32)]
            maps[mode] = {n: torch.cat([getattr(o, n) for o in out]).cpu().numpy() for n in names}
            for n in names:
                per_mode[mode][n][cat] = category_metrics(maps[mode][n], truth, labels, cfg)[0]
                moved[mode][n][0] += float(np.abs(maps[mode][n] - maps["same"][n]).sum())
                moved[mode][n][1] += float(np.abs(maps["same"][n]).sum())
    result = {}
    for mode in MODES:
        result[mode] = {}
        for n in names:
            cat_metrics = per_mode[mode][n]
            result[mode][n] = {"mean": category_mean(cat_metrics), "categories": cat_metrics,
                               "relative_change": moved[mode][n][0] / max(moved[mode][n][1], 1e-12)}
    return {"arch": cfg.model.arch, "input_size": size, "test_images": len(test), "modes": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders holding model.safetensors")
    ap.add_argument("--data", nargs="+", help="dataset roots, when they moved since training (data.roots)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the same/other prompt draws")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", type=Path, default=REPO / "runs" / "prompt-sensitivity")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
              "device": device_name(dev), "torch": torch.__version__, "runs": []}
    for run in args.runs:
        res = sensitivity(run, args.data, dev, args.seed)
        report["runs"].append(res)
        print(f"{run} ({res['arch']}, {res['input_size']} px, {res['test_images']} test images)")
        print(f"  {'prompt':6s} {'map':4s} " + " ".join(f"{v:>7s}" for v in NAMES) + "  moved")
        for mode in MODES:
            for n, r in res["modes"][mode].items():
                print(f"  {mode:6s} {n:4s} " + " ".join(f"{100 * r['mean'][k]:7.1f}" for k in KEYS)
                      + f"  {100 * r['relative_change']:5.1f} %")
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output / "prompt-sensitivity.json", portable(json.dumps(report, indent=2)))


if __name__ == "__main__":
    main()
