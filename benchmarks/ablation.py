"""The paper's Table 4a on iad-mix: one unified model per row, evaluated in both protocols, plus what goes beyond it.

Rows (all ten categories, the same schedule and backbone for every row; every prompted row trains with a random
normal image of the query's category as prompt, as the paper does; "static"/"dynamic" name the decoder, not how the
prompt is drawn, which is Table 4d's subject):

    0  UniAD                                   model.arch=uniad, no prompt, no restoration, no refiner
    1  static prompt                           UniAD's decoder with the encoded prompt as its queries
                                               (model.arch=static-prompt: the paper's "unidirectional decoder
                                               with static prompt"; the prompt is not updated)
    2  dynamic prompt                          OneNIP's bidirectional decoder (prompt and query update each other)
    3  restoration without prompt              UniAD + the restoration stream
    4  dynamic prompt + restoration            OneNIP + the restoration stream
    5  full OneNIP                             + the refiner

    python benchmarks/ablation.py --rows 0 1 2 3 4 5 --seeds 133 --epochs 180 --engine fast
    python benchmarks/ablation.py --rows 0 5 --seeds 134 135 --epochs 180 --engine fast     # seed spread of rows 0, 5
    python benchmarks/ablation.py --rows 5 --curve-every 10 --epochs 180                     # Fig. 1b curve (also row 0)
    python benchmarks/ablation.py --rows 5 --prompts 1 3 5                                    # K-prompt fusion
    python benchmarks/ablation.py --rows 5 --input-size 256 --tag 256px                       # 256-px input
    python benchmarks/ablation.py --rows 2 5 --sensitivity      # also: do the trained models use their prompt?

Every run writes <output>/<tag>row<R>-seed<S>.json: the configuration, the training log (with the clean-protocol test
metrics every --curve-every epochs when asked), and per protocol (and per K of --prompts) the per-category seven metrics,
retrieval accuracy, fusion constant and timings, with command, commit and device. `benchmarks/render_results.py`
turns the JSON files copied to docs/results/ into the tables and plots of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import data_options, data_overrides, device_name, git_commit, portable  # noqa: E402
from prompt_sensitivity import sensitivity_of  # noqa: E402

from onenip.api import make_config  # noqa: E402
from onenip.checkpoint import atomic_write_text  # noqa: E402
from onenip.evaluation.evaluate import evaluate  # noqa: E402
from onenip.training.trainer import Trainer  # noqa: E402

NO_EXTRAS = ["train.restoration=false", "model.refiner=false"]
ROWS: dict[int, tuple[str, list[str]]] = {
    0: ("UniAD", ["model.arch=uniad", "train.prompt=none", *NO_EXTRAS]),
    1: ("static prompt", ["model.arch=static-prompt", "train.prompt=dynamic", *NO_EXTRAS]),
    2: ("dynamic prompt", ["model.arch=onenip", "train.prompt=dynamic", *NO_EXTRAS]),
    3: ("restoration without prompt", ["model.arch=uniad", "train.prompt=none", "train.restoration=true",
                                       "model.refiner=false"]),
    4: ("dynamic prompt + restoration", ["model.arch=onenip", "train.prompt=dynamic", "train.restoration=true",
                                         "model.refiner=false"]),
    5: ("full OneNIP (+ refiner)", ["model.arch=onenip", "train.prompt=dynamic", "train.restoration=true",
                                    "model.refiner=true"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[133])
    data_options(ap)
    ap.add_argument("--epochs", type=int, default=180)
    ap.add_argument("--engine", default="plain", choices=["plain", "fast"])
    ap.add_argument("--curve-every", type=int, default=0,
                    help="evaluate (clean protocol) every this many epochs of rows 0 and 5: the Fig. 1b curve")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1], help="K of K-prompt fusion to evaluate (OneNIP rows)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="after evaluating a prompted row, score its test images with other prompts too "
                         "(benchmarks/prompt_sensitivity.py): does the trained model use its prompt?")
    ap.add_argument("--tag", default="", help="prefix of the result files (e.g. 256px)")
    ap.add_argument("--compile", default=None,
                    help="train.compile of the fast engine (default: 'default' on CUDA, none elsewhere)")
    ap.add_argument("--output", default=str(REPO / "runs" / "ablation"))
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    base = [*data_overrides(args), f"train.epochs={args.epochs}", f"train.engine={args.engine}",
            "eval.maps=[rec, ref, fused]"]
    if args.compile or (args.engine == "fast" and torch.cuda.is_available()):
        base.append(f"train.compile={args.compile or 'default'}")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    for seed in args.seeds:
        for row in args.rows:
            name, switches = ROWS[row]
            tag = f"{args.tag}{'-' if args.tag else ''}row{row}-seed{seed}"
            curve = args.curve_every if row in (0, 5) else 0
            cfg = make_config(None, base + switches + [f"train.seed={seed}", f"train.eval_every={curve}",
                                                        f"output_dir={out / tag}", *args.set])
            t0 = time.perf_counter()
            trainer = Trainer(cfg, progress=False)
            fit = trainer.run()
            report = {"row": row, "name": name, "seed": seed, "command": command, "commit": git_commit(),
                      "device": device_name(trainer.device), "torch": torch.__version__, "epochs": fit.epochs,
                      "steps": fit.steps, "train_seconds": round(fit.seconds, 1),
                      "train_query_images_per_s": round(fit.images_per_second, 1), "history": fit.history,
                      "config": cfg.to_dict(), "evaluations": []}
            ks = args.prompts if trainer.net.uses_prompt else [1]
            pool = cfg.eval.prompt_pool
            for k in ks:
                for protocol in ("clean", "paper"):
                    cfg.eval.protocol, cfg.eval.prompts = protocol, k
                    cfg.eval.prompt_pool = max(k, pool)  # K most similar prompts: at least K images per category
                    res = evaluate(trainer.detector, cfg, progress=False)
                    entry = {"protocol": protocol, "prompts": k, **res.to_dict()}
                    entry.pop("checkpoint", None)
                    report["evaluations"].append(entry)
                    m = res.mean("fused")
                    extra = (f", retrieval {100 * res.retrieval_accuracy:.2f} %" if res.retrieval_accuracy is not None
                             else "")
                    print(f"{tag} [{name}] {protocol} K={k}: " + ", ".join(f"{key} {100 * v:.1f}" for key, v in m.items())
                          + extra, flush=True)
            if args.sensitivity and trainer.net.uses_prompt:
                sens = sensitivity_of(trainer.detector, cfg, trainer.device, cfg.eval.seed)
                report["prompt_sensitivity"] = sens["modes"]
                print(f"{tag} prompt sensitivity (rec map, P-AP / moved): " + ", ".join(
                    f"{mode} {100 * v['rec']['mean']['pixel_ap']:.1f} / {100 * v['rec']['relative_change']:.1f} %"
                    for mode, v in sens["modes"].items()), flush=True)
            report["total_seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_text(out / f"{tag}.json", portable(json.dumps(report, indent=2, allow_nan=True)))  # whole or absent


if __name__ == "__main__":
    main()
