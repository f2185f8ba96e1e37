"""Known and unknown products, leave one type out: how many images of a type the model never saw are reported as
unknown, and how many images of known types are wrongly reported unknown.

    python benchmarks/unknown_types.py                      # iad-mix, tf_efficientnet_lite0 (offline ImageNet), 224 px

For each product type T of the data: a deployment is built, as `onenip fit` builds it, from the other types'
training images only (prompt pool, held-out split, thresholds, the product-type limits of `eval.unknown_margin` and
the colour models of `eval.colour_margin`, the rule of `eval.unknown_level` and `eval.unknown_candidates`); then the
deployed model (`DeployModel`, what predict runs) judges every test image of every type. The type check uses the frozen
backbone's features and the image's colour and texture alone (models.scoring.type_distance, colour_distance,
unknown_scores), so the network is not trained here: a small untrained one stands in (its maps are not measured).
Prints and writes unknown_types.json / .md to --output: per T, the share of T's test images reported unknown (goal
>= 95 %) and of the other types' test images (goal <= 1 %), and for a view of the two halves, how many lie beyond
the retrieved type's limit in each (the type distance, the colour distance) taken alone.

    python benchmarks/unknown_types.py --types PA_FVN01_TL --trained PA_FVN01_TL=runs/no-fvn01/run

With --trained TYPE=MODEL, a network trained without TYPE judges instead of the stand-in, with the deployment its
`fit` built (its prompt pool, thresholds and margins, recorded in the output): the row adds how many of TYPE's test
images that model judged defective and how many it passed as good (known and not defective), which is what an
unknown product costs on a line that trusts the decision.
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
from onenip.checkpoint import checkpoint_file  # noqa: E402
from onenip.data import read_sources  # noqa: E402
from onenip.data.tensors import SampleImages  # noqa: E402
from onenip.evaluation.calibration import build_deployment, split_holdout  # noqa: E402
from onenip.models.detector import Detector  # noqa: E402
from onenip.models.inference import DeployModel  # noqa: E402


@torch.no_grad()
def judge(model: DeployModel, samples: list, batch_size: int) -> dict[str, np.ndarray]:
    """The deployed model's known, type and colour flags and its decisions for `samples` (retrieved types, as predict
    runs it)."""
    out: dict[str, list[np.ndarray]] = {"known": [], "by_type": [], "by_colour": [], "anomalous": []}
    for b in torch.utils.data.DataLoader(SampleImages(samples, model.size), batch_size=batch_size):
        r = model(b["image"])
        out["known"].append(r["known"].numpy())
        out["anomalous"].append(r["anomalous"].numpy())
        out["by_type"].append((r["type_distance"] > model.type_limits[r["category"]]).numpy())  # the halves alone
        out["by_colour"].append((r["colour_distance"] > model.colour_limits[r["category"]]).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def trained_model(path: Path, left_out: str, types: list[str], size: int) -> Detector:
    """The detector of the model at `path`, with the deployment its fit built; refuses a model without one, one that
    knows `left_out` or lacks another of `types`, or one that works at another input size."""
    det = Detector.load(path).to("cpu").eval()
    if det.deployment is None:
        raise SystemExit(f"{path}: the model carries no deployment (train it with onenip fit)")
    if set(det.deployment.categories) != set(types) - {left_out}:
        raise SystemExit(f"{path}: trained on {', '.join(det.deployment.categories)}; leaving out {left_out} needs "
                         f"every other type of the data and not {left_out}")
    if det.input_size != size:
        raise SystemExit(f"{path}: input size {det.input_size}, not --input-size {size}")
    return det


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(iad_mix_root()))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="efficientnet-lite")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--margin", type=float, default=None, help="eval.unknown_margin (default: the configuration's)")
    ap.add_argument("--colour-margin", type=float, default=None,
                    help="eval.colour_margin (default: the configuration's; 0: the type distance alone)")
    ap.add_argument("--level", type=float, default=None, help="eval.unknown_level (default: the configuration's)")
    ap.add_argument("--candidates", type=int, default=None,
                    help="eval.unknown_candidates (default: the configuration's)")
    ap.add_argument("--types", nargs="*", default=None, help="the types to leave out (default: every one)")
    ap.add_argument("--trained", nargs="*", default=[], metavar="TYPE=MODEL",
                    help="a model trained without TYPE (run folder or model.safetensors) judges TYPE's row instead of "
                    "the stand-in, with the deployment its fit built")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output", default=str(REPO / "runs" / "unknown-types"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"data.roots=[{args.data}]", f"data.input_size={args.input_size}", f"backbone.name={args.backbone}",
                 f"backbone.weights={args.weights}", "data.workers=0", "model.hidden_dim=64", "model.ffn_dim=128",
                 "model.heads=4", "model.refiner_channels=32", "train.device=cpu"]
    if args.margin is not None:
        overrides.append(f"eval.unknown_margin={args.margin}")
    if args.colour_margin is not None:
        overrides.append(f"eval.colour_margin={args.colour_margin}")
    if args.level is not None:
        overrides.append(f"eval.unknown_level={args.level}")
    if args.candidates is not None:
        overrides.append(f"eval.unknown_candidates={args.candidates}")
    cfg = make_config(None, overrides)
    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    train_all = read_sources(cfg.data.roots, "train")
    test = read_sources(cfg.data.roots, "test")
    types = sorted({s.category for s in train_all})
    trained = dict(t.split("=", 1) for t in args.trained if "=" in t)
    if len(trained) != len(args.trained) or set(trained) - set(args.types or types):
        raise SystemExit(f"--trained takes TYPE=MODEL with TYPE one of the types left out "
                         f"({', '.join(args.types or types)}): got {args.trained}")
    rows, t0 = [], time.perf_counter()
    for left_out in args.types or types:
        if left_out in trained:
            path = checkpoint_file(trained[left_out], with_training_state=False)
            judge_det = trained_model(path, left_out, types, args.input_size)
            model = DeployModel(judge_det, judge_det.deployment)
        else:
            train, held = split_holdout([s for s in train_all if s.category != left_out], cfg.data.holdout,
                                        cfg.train.seed)
            model = DeployModel(det, build_deployment(det, train, held, cfg.eval.far, cfg))
        got = judge(model, test, cfg.eval.batch_size)
        mine = np.array([s.category == left_out for s in test])
        cats = np.array([s.category for s in test])
        good = np.array([s.label == 0 for s in test])
        share = {k: (float(v[mine].mean()), float(v[~mine].mean())) for k, v in
                 (("unknown", ~got["known"]), ("type", got["by_type"]), ("colour", got["by_colour"]))}
        rows.append({"left_out": left_out, "unseen_flagged": share["unknown"][0], "unseen_images": int(mine.sum()),
                     "known_flagged": share["unknown"][1], "known_images": int((~mine).sum()),
                     "unseen_by_type_distance": share["type"][0], "unseen_by_colour": share["colour"][0],
                     "known_by_type_distance": share["type"][1], "known_by_colour": share["colour"][1],
                     "known_good_flagged": float((~got["known"])[~mine & good].mean()),
                     "known_defective_flagged": float((~got["known"])[~mine & ~good].mean()),
                     "known_flagged_by_type": {k: float(1.0 - got["known"][cats == k].mean())
                                               for k in types if k != left_out}})
        if left_out in trained:  # a trained network's decisions on the type it never saw
            level, candidates, summed = judge_det.deployment.unknown_rule
            rows[-1].update({"model": portable(str(path)), "margin": judge_det.cfg.eval.unknown_margin,
                             "colour_margin": judge_det.cfg.eval.colour_margin,
                             "rule": f"sum <= {level:g} over {candidates} types" if summed else "either half",
                             "unseen_judged_defective": float((got["known"] & got["anomalous"])[mine].mean()),
                             "unseen_passed_as_good": float((got["known"] & ~got["anomalous"])[mine].mean()),
                             "known_defective_caught": float(got["anomalous"][~mine & ~good].mean()),
                             "known_good_passed": float((got["known"] & ~got["anomalous"])[~mine & good].mean())})
        print(f"{left_out}: {100 * share['unknown'][0]:.1f} % of its {mine.sum()} test images unknown; "
              f"{100 * share['unknown'][1]:.2f} % of {(~mine).sum()} known-type test images wrongly unknown", flush=True)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
            "device": device_name(torch.device("cpu")), "margin": cfg.eval.unknown_margin,
            "colour_margin": cfg.eval.colour_margin, "unknown_level": cfg.eval.unknown_level,
            "unknown_candidates": cfg.eval.unknown_candidates, "input_size": args.input_size,
            "backbone": args.backbone, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    lines = [f"Leave one type out, margin {cfg.eval.unknown_margin}, colour margin {cfg.eval.colour_margin}, unknown "
             f"when the summed fractions exceed {cfg.eval.unknown_level:g} for each of the "
             f"{cfg.eval.unknown_candidates} most similar types; "
             f"{args.backbone} at {args.input_size} px; commit {meta['commit']}; {meta['device']}.",
             f"Command: `{meta['command']}`", "",
             "| type left out | its test images reported unknown | beyond the retrieved type's limit: type distance / "
             "colour | known-type test images wrongly unknown | beyond the retrieved type's limit: type distance / "
             "colour | good / defective ones |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    pct = lambda r, k: f"{100 * r.get(k, float('nan')):.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['left_out']} | {100 * r['unseen_flagged']:.1f} % of {r['unseen_images']} | "
                     f"{pct(r, 'unseen_by_type_distance')} / {pct(r, 'unseen_by_colour')} | "
                     f"{100 * r['known_flagged']:.2f} % of {r['known_images']} | "
                     f"{100 * r['known_by_type_distance']:.2f} / {100 * r['known_by_colour']:.2f} | "
                     f"{100 * r['known_good_flagged']:.2f} / {100 * r['known_defective_flagged']:.2f} |")
    mean = {k: 100 * np.mean([r[k] for r in rows]) for k in ("unseen_flagged", "unseen_by_type_distance",
                                                                "unseen_by_colour", "known_flagged",
                                                                "known_by_type_distance", "known_by_colour",
                                                                "known_good_flagged", "known_defective_flagged")}
    lines.append(f"| **mean** | {mean['unseen_flagged']:.1f} % | {mean['unseen_by_type_distance']:.1f} / "
                 f"{mean['unseen_by_colour']:.1f} | {mean['known_flagged']:.2f} % | "
                 f"{mean['known_by_type_distance']:.2f} / {mean['known_by_colour']:.2f} | "
                 f"{mean['known_good_flagged']:.2f} / {mean['known_defective_flagged']:.2f} |")
    for r in rows:
        if "model" in r:
            lines += ["", f"{r['left_out']} judged by a network trained without it (`{r['model']}`, the deployment its "
                      f"fit built: margin {r['margin']}, colour margin {r['colour_margin']}, rule {r['rule']}): of its "
                      f"{r['unseen_images']} test images {100 * r['unseen_flagged']:.1f} % unknown, "
                      f"{100 * r['unseen_judged_defective']:.1f} % judged defective, "
                      f"{100 * r['unseen_passed_as_good']:.1f} % passed as good; of the known types' test images, "
                      f"{100 * r['known_defective_caught']:.1f} % of the defective ones judged defective and "
                      f"{100 * r['known_good_passed']:.1f} % of the good ones passed."]
    table = "\n".join(lines)
    print(table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unknown_types.json").write_text(portable(json.dumps(meta, indent=2)))
    (out / "unknown_types.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
