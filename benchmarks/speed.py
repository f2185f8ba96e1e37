"""Speed of the plain and the fast path, measured in one process: training images/s, inference latency and throughput.

    python benchmarks/speed.py                      # efficientnet_b4 (random weights), 224 px, on the GPU when there is one
    python benchmarks/speed.py --device cpu --threads 2 --train-steps 3 --infer-iters 3 --infer-batch 8   # the CPU figure

Training: one `Trainer` per engine (train.engine=plain: DataLoader workers make the items with numpy/PIL on the CPU;
train.engine=fast: images kept on the device, synthesis there in batches, bf16 channels-last backbone, fused AdamW,
torch.compile on CUDA) on the iad-mix training images. After --warmup steps, --train-steps optimizer steps are timed end
to end, data included. Query images/s = steps x batch / seconds (each query also brings its synthetic copy and prompt).
Random backbone weights are fine for timing: the arithmetic is the same.

Inference: the trained network with a prompt pool of one image per category. Image in (a uint8 batch on the host),
score and map out (copied back to the host). plain: float32 eager, every query encodes its prompt again. fast: prompt
encodings cached, bf16 channels-last backbone, bf16 transformer, torch.compile on CUDA. Latency is the median of
--infer-iters calls at batch 1; throughput uses --infer-batch.

Synthesis: the fast path's batched pseudo-anomalies alone (one training batch), in both ways of applying per-sample
choices (`BatchSynthesizer.select_by_index`: rows gathered by index, or everything computed and kept with torch.where;
with --compile-synthesis the torch.where form is the compiled one).

Prints a Markdown table and writes speed.json beside it in --output.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import data_options, data_overrides, device_name, git_commit, portable  # noqa: E402

from onenip.api import make_config  # noqa: E402
from onenip.evaluation.evaluate import build_prompt_pool  # noqa: E402
from onenip.models.deployment import Deployment  # noqa: E402
from onenip.models.inference import DeployModel  # noqa: E402
from onenip.training.trainer import Trainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(trainer: Trainer):
    """The trainer's full batches without end, epoch after epoch. An epoch's short last batch (1,519 images at batch
    64 leave 47) is left out: with torch.compile(dynamic=False) its other shape would compile a second graph inside
    the timed window, which a long run pays once but a 50-step timing would count as training time."""
    epoch, full = 0, trainer.local_batch
    while True:
        trainer.sampler.set_epoch(epoch)
        yield from (b for b in trainer.loader if len(b["index"]) == full)
        epoch += 1


def time_training(trainer: Trainer, warmup: int, steps: int) -> float:
    """Query images per second over `steps` optimizer steps of full batches after `warmup` (across epochs)."""
    images, start = 0, 0.0
    for i, batch in enumerate(batches(trainer)):
        if i == warmup:
            sync(trainer.device)
            start = time.perf_counter()
        trainer.train_step(batch)
        if i >= warmup:
            images += len(batch["index"])
        if i == warmup + steps - 1:
            break
    sync(trainer.device)
    return images / (time.perf_counter() - start)


def time_inference(model: DeployModel, images: torch.Tensor, iters: int, warmup: int) -> list[float]:
    """Seconds per call: host uint8 batch -> device -> model -> score and map back on the host."""
    dev = model.pool_feats.device
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            sync(dev)
            t0 = time.perf_counter()
            out = model(images.to(dev, non_blocking=True))
            score, amap = out["score"].cpu(), out["map"].cpu()
            sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    assert score.shape[0] == amap.shape[0] == images.shape[0]
    return times


def count_ops(fn: Callable[[], object]) -> int:
    """How many ATen operations `fn` dispatches (eager, on a GPU all but the views among them are kernel launches;
    views and other metadata-only operations are counted too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.n = getattr(self, "n", 0) + 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return getattr(counter, "n", 0)


def profile_steps(trainer: Trainer, steps: int, path: Path) -> None:
    """torch.profiler over `steps` training steps: the operators by device (or CPU) time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    it = batches(trainer)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.train_step(next(it))
        sync(trainer.device)
    key = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    print(f"profile of {steps} fast steps: {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_options(ap, backbone="efficientnet_b4", weights="random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: default)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--infer-iters", type=int, default=50)
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--compile", default=None,
                    help="torch.compile mode of the fast path's training (default: 'default' on CUDA, none on the CPU)")
    ap.add_argument("--infer-compile", default=None,
                    help="torch.compile mode of the fast inference (default: 'reduce-overhead', i.e. CUDA graphs, on "
                         "CUDA; none on the CPU); 'none' for eager")
    ap.add_argument("--compile-synthesis", default="none",
                    help="train.compile_synthesis of the fast path: torch.compile its batched synthesis (none: eager)")
    ap.add_argument("--profile", type=int, default=0,
                    help="profile this many fast training steps after the timing; the table goes to profile.txt")
    ap.add_argument("--engines", nargs="+", default=["plain", "fast"], choices=["plain", "fast"])
    ap.add_argument("--output", default=str(REPO / "runs" / "speed"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = [*data_overrides(args), f"train.device={args.device}", *args.set]
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda") or args.device.startswith("cuda")
    out_dir = Path(args.output)
    rows: dict[str, dict[str, float]] = {}
    trainers: dict[str, Trainer] = {}
    meta = {"device": None, "commit": git_commit(), "torch": torch.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "backbone": args.backbone,
            "input_size": args.input_size, "batch_size": args.batch_size, "infer_batch": args.infer_batch,
            "threads": torch.get_num_threads(), "complete": False, "rows": rows}

    def save(phase: str) -> None:
        """speed.json after each phase, so that a run stopped by a time limit keeps what it measured; "complete" is
        true only at the end."""
        meta["done"] = phase
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "speed.json.tmp"
        tmp.write_text(portable(json.dumps(meta, indent=2)))
        tmp.replace(out_dir / "speed.json")
    for engine in args.engines:
        mode = args.compile or ("default" if engine == "fast" and cuda else "none")
        synthesis = [f"train.compile_synthesis={args.compile_synthesis}"] if engine == "fast" else []
        cfg = make_config(None, base + [f"train.engine={engine}", f"train.compile={mode}", *synthesis,
                                        f"output_dir={out_dir / engine}"])
        torch.manual_seed(0)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, progress=False)
        setup = time.perf_counter() - t0
        ips = time_training(trainer, args.warmup, args.train_steps)
        rows[engine] = {"train_images_per_s": ips, "setup_s": setup, "compile": mode}
        if engine == "fast":
            rows[engine]["compile_synthesis"] = args.compile_synthesis
        trainers[engine] = trainer
        print(f"{engine}: training {ips:.1f} query images/s (setup {setup:.1f} s)", flush=True)
        meta["device"] = device_name(trainer.device)
        save(f"training {engine}")

    det = next(iter(trainers.values())).detector
    det.eval()
    samples = next(iter(trainers.values())).dataset.samples
    pool = build_prompt_pool(det, samples, det.cfg)
    dep = Deployment(pool_feats=pool.feats, pool_categories=pool.categories,
                     pool_images=[str(s.image) for s in pool.samples], fusion_scale=1.0,
                     thresholds={c: 1.0 for c in set(pool.categories)})
    dev = pool.feats.device
    gen = torch.Generator().manual_seed(0)
    size = args.input_size
    for engine in args.engines:
        model = DeployModel(det, dep, cache_prompts=engine == "fast").to(dev)
        if engine == "fast":
            mode = args.infer_compile or ("reduce-overhead" if dev.type == "cuda" else "none")
            model.optimize(None if mode == "none" else mode)
            rows[engine]["infer_compile"] = mode
        one = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=gen)
        many = torch.randint(0, 256, (args.infer_batch, 3, size, size), dtype=torch.uint8, generator=gen)
        if dev.type == "cuda":
            one, many = one.pin_memory(), many.pin_memory()
        lat = time_inference(model, one, args.infer_iters, args.warmup)
        thr = time_inference(model, many, max(3, args.infer_iters // 5), max(2, args.warmup // 3))
        rows[engine].update({"latency_ms_batch1": 1e3 * statistics.median(lat),
                             "infer_images_per_s": args.infer_batch / statistics.median(thr)})
        print(f"{engine}: inference {rows[engine]['latency_ms_batch1']:.2f} ms at batch 1, "
              f"{rows[engine]['infer_images_per_s']:.0f} images/s at batch {args.infer_batch}", flush=True)
        save(f"inference {engine}")

    device = trainers[args.engines[0]].device
    if "fast" in trainers:
        batches = trainers["fast"].loader
        idx = torch.arange(args.batch_size, device=device) % batches.images.shape[0]
        pool = batches.textures if batches.textures is not None else batches.images
        chosen = batches.synthesizer.select_by_index  # None (by device), or False with --compile-synthesis
        for by_index in (True, False):
            batches.synthesizer.select_by_index = by_index
            gen = torch.Generator(device=device).manual_seed(0)
            times = []
            for i in range(args.warmup + args.train_steps):
                sync(device)
                t0 = time.perf_counter()
                batches.synthesizer(batches.images[idx], gen, pool)
                sync(device)
                times.append(time.perf_counter() - t0)
            key = "synthesis_ms_by_index" if by_index else "synthesis_ms_where"
            rows["fast"][key] = 1e3 * statistics.median(times[args.warmup:])
            ops = 0 if batches.synthesizer.compiled else count_ops(
                lambda: batches.synthesizer(batches.images[idx], gen, pool))  # eager: what one batch launches
            if ops:
                rows["fast"][key.replace("_ms_", "_ops_")] = ops
            print(f"synthesis ({'by index' if by_index else 'torch.where'}): {rows['fast'][key]:.1f} ms per batch "
                  f"of {args.batch_size}" + (f", {ops} operations" if ops else ""), flush=True)
        batches.synthesizer.select_by_index = chosen
        save("synthesis")
    if args.profile and "fast" in trainers:
        profile_steps(trainers["fast"], args.profile, out_dir / "profile.txt")
    lines = [f"Device: {meta['device']}; commit {meta['commit']}; torch {meta['torch']}; {args.backbone} at {size} px.",
             f"Command: `{meta['command']}`", "",
             f"| path | training (query img/s, batch {args.batch_size}) | inference latency, batch 1 (ms) | "
             f"inference (img/s, batch {args.infer_batch}) |", "| --- | ---: | ---: | ---: |"]
    for engine, r in rows.items():
        lines.append(f"| {engine} | {r['train_images_per_s']:.1f} | {r['latency_ms_batch1']:.2f} | "
                     f"{r['infer_images_per_s']:.1f} |")
    if "plain" in rows and "fast" in rows:
        p, f = rows["plain"], rows["fast"]
        lines.append(f"| fast / plain | {f['train_images_per_s'] / p['train_images_per_s']:.2f}x | "
                     f"{p['latency_ms_batch1'] / f['latency_ms_batch1']:.2f}x as fast | "
                     f"{f['infer_images_per_s'] / p['infer_images_per_s']:.2f}x |")
    if "synthesis_ms_by_index" in rows.get("fast", {}):
        f = rows["fast"]
        lines += ["", f"Fast path's synthesis of one batch of {args.batch_size}: {f['synthesis_ms_by_index']:.1f} ms "
                  f"with rows gathered by index, {f['synthesis_ms_where']:.1f} ms computed whole and kept by torch.where."]
        if "synthesis_ops_where" in f:
            lines[-1] += (f" Eager, one batch dispatches {f['synthesis_ops_by_index']:,} and {f['synthesis_ops_where']:,} "
                          "operations (views included).")
    table = "\n".join(lines)
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.md").write_text(table + "\n")
    meta["complete"] = True
    save("all")


if __name__ == "__main__":
    main()
