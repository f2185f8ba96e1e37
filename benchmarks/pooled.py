"""One ranking for all categories: the mean of per-category image metrics against the pooled ones, and the decisions
of the deployed models at their own thresholds.

    python benchmarks/pooled.py runs/abl224/cpu224-row0-seed1 runs/abl224/cpu224-row5-seed1 --output runs/pooled224

A unified model serves every category with one network, but a mean of per-category AUROCs never compares a good image
of one category with a defective image of another. For each trained model (a run folder or a model file) this runs
`onenip test` in the clean protocol (the deployed model, image for image) and reports, for the fused map:

* the unweighted mean over categories of image AUROC / AP / F1-max (the usual table);
* the same metrics of all test images ranked together by their raw score (`pooled`);
* the same of score / threshold of the retrieved category (`relative`: the ranking of `onenip predict`'s normalised
  score, whose 0.5 is every category's threshold);
* the false alarms and misses at the model's thresholds, and where those thresholds came from.

Each model's result folder (results.json, results.md, scores.csv) goes under --output, and pooled.json beside them,
with the command, commit and device.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import device_name, git_commit, portable  # noqa: E402

from onenip.api import test  # noqa: E402
from onenip.checkpoint import atomic_write_text  # noqa: E402
from onenip.evaluation.evaluate import IMAGE_METRICS, Results  # noqa: E402
from onenip.models.detector import resolve_device  # noqa: E402


def summary(res: Results) -> dict:
    mean = res.mean("fused")
    out = {"mean": {m: mean[m] for m in IMAGE_METRICS}, "pooled": res.pooled("fused"),
           "retrieval_accuracy": res.retrieval_accuracy, "decisions_note": res.decisions_note}
    if res.decisions is not None:
        d = res.decisions
        out.update(relative=d["pooled_relative"], decisions=d["all"], per_category=d["categories"],
                   threshold_source=sorted({str(c.get("source", "?")) for c in d["calibration"].values()}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="run folders (with model.safetensors) or model files")
    ap.add_argument("--output", default=str(REPO / "runs" / "pooled"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other option of `onenip test`")
    args = ap.parse_args()
    out = Path(args.output)
    device = resolve_device(args.device)
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
              "device": device_name(device), "torch": torch.__version__, "models": {}}
    for given in args.models:
        path = Path(given)
        model = path / "model.safetensors" if path.is_dir() else path
        name = path.name if path.is_dir() else path.parent.name
        res = test(model, overrides=[f"train.device={device}", "eval.protocol=clean", "eval.prompts=1", *args.set],
                   output=out / name, progress=False)
        report["models"][name] = summary(res)
        s = report["models"][name]
        line = f"{name}: I-AUROC mean {100 * s['mean']['image_auroc']:.1f}, pooled {100 * s['pooled']['image_auroc']:.1f}"
        if "decisions" in s:
            d = s["decisions"]
            line += (f", relative {100 * s['relative']['image_auroc']:.1f}; false alarms {d['false_alarms']}/{d['good']},"
                     f" misses {d['missed']}/{d['defective']}")
        else:
            line += f"; no decisions: {s['decisions_note']}"
        print(line, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pooled.json", portable(json.dumps(report, indent=2, allow_nan=True)))
    print(f"wrote {out / 'pooled.json'}")


if __name__ == "__main__":
    main()
