"""How often the clean protocol's prompt retrieval picks the test image's true category, against the pool size.

    python benchmarks/retrieval.py                          # iad-mix, tf_efficientnet_lite0 (offline ImageNet), 224 px
    python benchmarks/retrieval.py --pools 1 2 4 8 16 --seeds 0 1 2

Retrieval needs only the frozen backbone (no training): every training and test image's features are computed once;
for each pool size P (`eval.prompt_pool`: P normal training images per category, drawn as the evaluation draws them,
with each of --seeds as `eval.seed`) a test image's prompt is the pool image whose spatially averaged features are
most similar (cosine). Prints accuracy per pool size (mean and range over seeds) and the most frequent confusions,
and writes retrieval.json to --output.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import data_options, data_overrides, device_name, git_commit, portable  # noqa: E402

from onenip.api import make_config  # noqa: E402
from onenip.data import read_sources  # noqa: E402
from onenip.evaluation.evaluate import features_of  # noqa: E402
from onenip.models.detector import Detector, resolve_device  # noqa: E402
from onenip.models.prompts import PromptPool, pool_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_options(ap)
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="eval.seed values (which pool images)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: default)")
    ap.add_argument("--output", default=str(REPO / "runs" / "retrieval"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(None, [*data_overrides(args), f"train.device={args.device}", *args.set])
    det = Detector.build(cfg).eval()
    dev = resolve_device(args.device)
    det.to(dev)
    cats = cfg.data.categories or None
    train = read_sources(cfg.data.roots, "train", cats)
    test = read_sources(cfg.data.roots, "test", cats)
    t0 = time.perf_counter()
    train_feats = features_of(det, train, cfg)  # (N, C, H, W)
    test_feats = features_of(det, test, cfg)
    seconds = time.perf_counter() - t0
    index = {s.image: i for i, s in enumerate(train)}
    truth = [s.category for s in test]
    rows = []
    for p in args.pools:
        accs, confusions = [], Counter()
        for seed in args.seeds:
            samples = pool_samples(train, p, seed)
            pool = PromptPool(samples, train_feats[[index[s.image] for s in samples]])
            j, _ = pool.retrieve(test_feats)
            got = [pool.categories[k] for k in j.tolist()]
            accs.append(sum(g == t for g, t in zip(got, truth)) / len(truth))
            confusions.update((t, g) for g, t in zip(got, truth) if g != t)
        rows.append({"pool_per_category": p, "accuracy": accs, "mean": sum(accs) / len(accs),
                     "confusions": [[t, g, n] for (t, g), n in confusions.most_common(5)]})
        print(f"pool {p:3d} per category: retrieval right for {100 * min(accs):.2f}-{100 * max(accs):.2f} % "
              f"(mean {100 * rows[-1]['mean']:.2f} %) over seeds {args.seeds}; most confused (true -> retrieved, "
              f"count over seeds): {rows[-1]['confusions'][:3]}", flush=True)
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
              "device": device_name(dev), "torch": torch.__version__, "backbone": cfg.backbone.name,
              "weights": cfg.backbone.weights, "input_size": cfg.data.input_size, "train_images": len(train),
              "test_images": len(test), "feature_seconds": round(seconds, 1), "seeds": args.seeds, "rows": rows}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(portable(json.dumps(report, indent=2)))


if __name__ == "__main__":
    main()
