"""New product types without retraining, leave one type out: a type added from K normal images (`onenip add-type`)
against the same type in a model trained with it.

    python benchmarks/add_type.py                           # iad-mix, tf_efficientnet_lite0, 224 px, K = 1, 4, 16

For each type T: a deployment of the other types (their prompt pool: eval.prompt_pool training images each), then T
added with `onenip.evaluation.calibration.add_type` from K of its training images (drawn with each of --seeds), then
`onenip.evaluation.evaluate` on T's test images (clean protocol: T's images must retrieve T among all types; with
--given-type their type is given, as `onenip predict --type` gives it on a line) with the seven metrics. An added
type is scored by the training-free prompt map, which uses the frozen backbone alone, so the network is not trained
here (a small untrained one stands in; its maps are not what is measured). The reference,
--trained (default: the recorded 180-epoch Lite0 224-px run in docs/results), is the trained model's row for T; its
device and commit are printed with it. Writes add_type.json / .md to --output.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import device_name, git_commit, iad_mix_root, portable  # noqa: E402

from onenip.api import make_config  # noqa: E402
from onenip.data import read_sources  # noqa: E402
from onenip.evaluation.calibration import add_type  # noqa: E402
from onenip.evaluation.evaluate import METRIC_NAMES, METRICS, build_prompt_pool, evaluate  # noqa: E402
from onenip.models.deployment import Deployment  # noqa: E402
from onenip.models.detector import Detector  # noqa: E402
from onenip.models.prompts import pool_samples  # noqa: E402

SHORT = dict(zip(METRICS, METRIC_NAMES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(iad_mix_root()))
    ap.add_argument("--types", nargs="*", default=None, help="types to leave out (default: every one)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16], help="K, normal images of the added type")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="which K images (one draw per seed)")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--trained", default=str(REPO / "docs" / "results" / "iad-mix-onenip-lite0-224.json"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--given-type", action="store_true",
                    help="each test image's type is given (eval.given_type, as predict --type), not retrieved")
    ap.add_argument("--retrieval", choices=["nearest", "type_mean"], default="nearest",
                    help="eval.retrieval: the nearest pool image of all (the paper's), or the type by its pool images' "
                         "mean descriptor first")
    ap.add_argument("--output", default=str(REPO / "runs" / "add-type"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(None, [f"data.roots=[{args.data}]", f"data.input_size={args.input_size}", "data.workers=0",
                             "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
                             "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "model.refiner_channels=32",
                             "train.device=cpu", f"eval.given_type={str(args.given_type).lower()}",
                             f"eval.retrieval={args.retrieval}"])
    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    train_all = read_sources(cfg.data.roots, "train")
    types = sorted({s.category for s in train_all})
    trained = json.loads(Path(args.trained).read_text()) if Path(args.trained).is_file() else None
    rows, t0 = [], time.perf_counter()
    for left_out in args.types or types:
        others = [s for s in train_all if s.category != left_out]
        pool = build_prompt_pool(det, others, cfg)
        base = Deployment(pool_feats=pool.feats, pool_categories=pool.categories,
                          pool_images=[str(s.image) for s in pool.samples], fusion_scale=None,
                          thresholds={c: float("inf") for c in set(pool.categories)})
        mine = [s for s in train_all if s.category == left_out]
        for k in args.shots:
            for seed in args.seeds:
                shots = pool_samples(mine, k, seed)
                det.deployment = base
                t_add = time.perf_counter()
                det.deployment = add_type(det, left_out, [s.image for s in shots], margin=0.0)  # no unknown check
                t_add = time.perf_counter() - t_add
                run_cfg = make_config(cfg, [f"data.categories=[{left_out}]"])
                res = evaluate(det, run_cfg, progress=False)
                entry = res.categories[left_out]["fused"]
                rows.append({"type": left_out, "k": k, "seed": seed, **{m: entry[m] for m in METRICS},
                             "retrieval_accuracy": res.categories[left_out].get("retrieval_accuracy"),
                             "add_seconds": round(t_add, 3)})
                print(f"{left_out} K={k} seed {seed}: " + ", ".join(f"{SHORT[m]} {100 * entry[m]:.1f}" for m in METRICS)
                      + f"; retrieved as itself {100 * rows[-1]['retrieval_accuracy']:.0f} %; added in {t_add:.2f} s", flush=True)
    ref = {}
    if trained is not None:
        for t in {r["type"] for r in rows}:
            ref[t] = trained["protocols"]["clean"]["categories"][t]["fused"]
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
            "device": device_name(torch.device("cpu")), "input_size": args.input_size, "given_type": args.given_type,
            "retrieval": args.retrieval,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
            "trained": None if trained is None else {"file": str(Path(args.trained).relative_to(REPO)),
                                                     "device": trained["device"], "commit": trained["commit"],
                                                     "epochs": trained["epochs"], "categories": ref}}
    lines = [f"Added types, leave one out; tf_efficientnet_lite0 at {args.input_size} px; commit {meta['commit']}; "
             f"{meta['device']}.", f"Command: `{meta['command']}`", "",
             "| type | how | " + " | ".join(SHORT[m] for m in METRICS) + " | I-AUROC / trained |",
             "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " | ---: |"]
    for t in sorted({r["type"] for r in rows}):
        if t in ref:
            lines.append(f"| {t} | trained ({trained['epochs']} epochs, {trained['device']}) | "
                         + " | ".join(f"{100 * ref[t][m]:.1f}" for m in METRICS) + " | 1.00 |")
        for k in args.shots:
            mine = [r for r in rows if r["type"] == t and r["k"] == k]
            mean = {m: float(np.mean([r[m] for r in mine])) for m in METRICS}
            ratio = mean["image_auroc"] / ref[t]["image_auroc"] if t in ref else float("nan")
            lines.append(f"| {t} | added, K = {k} | " + " | ".join(f"{100 * mean[m]:.1f}" for m in METRICS)
                         + f" | {ratio:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "add_type.json").write_text(portable(json.dumps(meta, indent=2)))
    (out / "add_type.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
