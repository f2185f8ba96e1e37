"""Benchmark: one unified OneNIP model on all ten iad-mix categories at 224 px, evaluated in both protocols.

Trains with the offline ImageNet EfficientNet-Lite backbone (or any backbone given), evaluates the final model under the
clean protocol (category not given: prompt retrieval; fusion constant from training images) and the paper protocol
(random prompt of the true category; fusion constant from the test set), and writes benchmark.json and benchmark.md
(per-category tables of the seven metrics, training time and images/s, device, versions, command) to --output.

    python benchmarks/iad_mix.py --epochs 200                   # GPU when there is one
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from onenip.api import make_config  # noqa: E402
from onenip.evaluation.evaluate import METRICS, defined_means, evaluate, write_results  # noqa: E402
from onenip.training.trainer import Trainer  # noqa: E402


def _read_commit() -> str:
    """ONENIP_COMMIT when set (gpu_session.sh sets it: the device machine gets the working tree without .git), else
    git's HEAD."""
    if os.environ.get("ONENIP_COMMIT"):
        return os.environ["ONENIP_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


_COMMIT_AT_START = _read_commit()  # read when the code is imported: a commit made during a long run is not its code


def git_commit() -> str:
    """The commit whose code this process runs (HEAD when the benchmark started)."""
    return _COMMIT_AT_START


def code_stamp() -> str:
    """The commit and a hash of how src/ differs from it (tracked changes and untracked files): equal stamps, the
    same library code. A file exported by an earlier run is reused only under the same stamp."""
    digest = hashlib.sha256(git_commit().encode())
    try:
        diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=REPO, capture_output=True, check=True).stdout
        new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "src"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return f"unknown {os.urandom(8).hex()}"  # equal to no stamp read back: nothing is reused
    digest.update(diff)
    for name in sorted(new):
        digest.update(name.encode() + (REPO / name).read_bytes())
    return f"{git_commit()}+{digest.hexdigest()[:16]}"


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name: the first 'model name' of `cpuinfo` (Linux), else the platform's processor or machine
    name, else 'unknown CPU'."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or platform.machine() or "unknown CPU"


def cpu_info() -> dict[str, object]:
    """The CPU's model name (`cpu_name`), its cores, and the flags (lscpu's) that decide the low-precision paths."""
    flags = set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return {"model": cpu_name(), "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def package_versions(*names: str) -> dict[str, str]:
    """torch's version and each named package's that imports (those that do not are left out)."""
    versions = {"torch": torch.__version__}
    for name in names:
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            pass
    return versions


def source_changes() -> list[str]:
    """Files of src/ that differ from the commit (git status): the figures are of the working tree's code."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def run_lines(command: str, commit: str, changes: list[str], cpu: Mapping[str, object], threads: int,
              versions: Mapping[str, str], per: str = "") -> list[str]:
    """The first lines of a CPU benchmark's Markdown: its command, and its commit (with src's uncommitted changes),
    CPU, threads (`per`: "per runtime", ...) and package versions."""
    return [f"- command: `{command}`",
            f"- commit {commit}" + (f" (with uncommitted changes in {', '.join(changes)})" if changes else "")
            + f"; CPU: {cpu['model']}, {cpu['cores']} cores ({', '.join(cpu['flags'])}); {threads} threads"
            + (f" {per}" if per else "") + "; " + ", ".join(f"{k} {v}" for k, v in versions.items())]


def profile_line(name: str, prof: Mapping, layer_types: int) -> str:
    """One Markdown paragraph of an OpenVINO profile (`cpu_speed.openvino_profile`): its total, AMX share, the time
    by part of the model and of the `layer_types` slowest layer types."""
    return (f"{name}, batch 1, OpenVINO PERF_COUNT ({prof['total_ms']:.1f} ms in all, "
            f"{100 * prof['amx_share']:.0f} % in AMX kernels); by part (approximate): "
            + "; ".join(f"{k} {v:.2f}" for k, v in prof["parts"].items())
            + "; by layer type: " + "; ".join(f"{k} {v:.2f}" for k, v in prof["top"][:layer_types]))


class OtherWork:
    """How many cores other processes kept busy, on average, while a phase ran: the machine's busy time (/proc/stat)
    less this process's own CPU time, over the phase's wall time. More than a few tenths: the phase's times are slowed
    by other work (on 2 cores, 1.0 takes half the machine). None where /proc/stat cannot be read."""

    def __enter__(self) -> OtherWork:
        self.start = (self.busy(), os.times(), time.perf_counter())
        self.cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = self.busy(), os.times(), time.perf_counter()
        if busy is not None and self.start[0] is not None:
            mine = own.user + own.system - self.start[1].user - self.start[1].system
            self.cores = max(0.0, (busy - self.start[0] - mine) / (wall - self.start[2]))

    @staticmethod
    def busy() -> float | None:
        """Seconds the machine's CPUs have been busy since boot (user, nice, system, irq, softirq, steal)."""
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Phases:
    """The phases of a timing run, each measured under `OtherWork`: `cores[name]`, the cores other processes kept busy
    while it ran (None where /proc/stat cannot be read), and a printed line of its results."""

    def __init__(self) -> None:
        self.cores: dict[str, float | None] = {}

    def run(self, name: str, measure: Callable[[], dict[str, float]], show: Callable[[float], str]) -> dict[str, float]:
        """`measure()` (per runtime, its seconds) under `OtherWork`, recorded as `name`; prints each value as `show`
        writes it."""
        with OtherWork() as work:
            result = measure()
        self.cores[name] = work.cores
        print(f"{name}: " + ", ".join(f"{k} {show(v)}" for k, v in result.items())
              + f" [other processes: {work.cores or 0:.2f} cores]", flush=True)
        return result

    def text(self) -> str:
        """The cores of every phase, for a report: 'batch 1 0.01, batch 8 0.02'."""
        return ", ".join(f"{k} {'?' if v is None else f'{v:.2f}'}" for k, v in self.cores.items())


def device_name(device: torch.device) -> str:
    """The device the benchmark ran on, for its report: the GPU's name, or the CPU's core count and `cpu_name`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {cpu_name()})"


def iad_mix_root() -> Path:
    """The iad-mix dataset (MVTec layout; the texture folder `textures` lies beside it): DATA/iad-mix, DATA being
    $ONENIP_DATA when set, else shared/data beside the repository (as the test suite looks for the real data). The
    path is returned whether or not it exists (a --data default; `is_dir()` tells)."""
    return Path(os.environ.get("ONENIP_DATA") or REPO.parent / "shared" / "data").expanduser() / "iad-mix"


def portable(text: str) -> str:
    """A result's text with the data folder's path (`iad_mix_root`'s parent, as given and resolved) written as
    `$ONENIP_DATA`: result files name the dataset, not the machine's folders."""
    data = iad_mix_root().parent
    for path in sorted({str(data), str(data.resolve())}, key=len, reverse=True):
        text = text.replace(path, "$ONENIP_DATA")
    return text


def category_mean(categories: Mapping[str, Mapping[str, float]] | Iterable[Mapping[str, float]],
                  metrics: Iterable[str] = METRICS) -> dict[str, float]:
    """The unweighted mean over categories of each metric (of `metrics`) of per-category metric dicts ({category:
    metrics} or the dicts alone), over the categories where it is defined: `onenip.evaluation.evaluate.defined_means`,
    `Results.mean`'s rule."""
    return defined_means(categories.values() if isinstance(categories, Mapping) else categories, tuple(metrics))


def data_options(ap: argparse.ArgumentParser, backbone: str = "tf_efficientnet_lite0",
                 weights: str = "efficientnet-lite") -> None:
    """The options every benchmark shares: data, backbone, input size, batch, workers, free overrides."""
    root = iad_mix_root()
    ap.add_argument("--data", default=str(root))
    ap.add_argument("--textures", default=str(root.parent / "textures"))
    ap.add_argument("--backbone", default=backbone)
    ap.add_argument("--weights", default=weights, help="backbone.weights (a file works offline anywhere; random for timing)")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64, help="training batch (query images per step)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="DataLoader workers")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other option")


def data_overrides(args: argparse.Namespace) -> list[str]:
    """Configuration overrides of `data_options`; trains on every normal image, as the paper (data.holdout=0)."""
    return [f"data.roots=[{args.data}]", f"data.textures={args.textures}", f"data.input_size={args.input_size}",
            f"data.workers={args.workers}", f"backbone.name={args.backbone}", f"backbone.weights={args.weights}",
            f"train.batch_size={args.batch_size}", "data.holdout=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_options(ap)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--output", default=str(REPO / "runs" / "bench-iad-mix"))
    args = ap.parse_args()

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.output)
    base = [*data_overrides(args), "eval.maps=[rec, ref, fused]", *args.set]
    epochs = args.epochs
    cfg = make_config(None, base + [f"train.epochs={epochs}", f"output_dir={out / 'run'}"])

    trainer = Trainer(cfg, progress=False)
    fit = trainer.run()
    detector = trainer.detector
    report: dict = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "commit": git_commit(),
        "device": device_name(trainer.device),
        "torch": torch.__version__,
        "epochs": fit.epochs,
        "steps": fit.steps,
        "train_seconds": round(fit.seconds, 1),
        "train_query_images_per_s": round(fit.images_per_second, 1),
        "config": cfg.to_dict(),
        "protocols": {},
    }
    import timm

    report["timm"] = timm.__version__
    for protocol in ("clean", "paper"):
        cfg.eval.protocol = protocol
        results = evaluate(detector, cfg, progress=False)
        write_results(results, out / f"results-{protocol}")
        report["protocols"][protocol] = results.to_dict()
        report["protocols"][protocol]["markdown"] = results.to_markdown("fused")
        print(f"\n## {protocol} protocol" + (f" (retrieval accuracy {100 * results.retrieval_accuracy:.2f} %)"
                                              if results.retrieval_accuracy is not None else ""))
        print(results.to_markdown("fused"), flush=True)
        for name in ("rec", "ref") if detector.net.refiner is not None else ():
            m = results.mean(name)
            print(f"mean of map {name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in m.items()))
        print(f"evaluation seconds: {results.seconds}")

    md = [
        "# iad-mix benchmark", "",
        f"- command: `{report['command']}`", f"- commit: {report['commit']}", f"- device: {report['device']}",
        f"- torch {report['torch']}, timm {report['timm']}",
        f"- training: {fit.epochs} epochs, {fit.steps} steps, {fit.seconds:.0f} s, "
        f"{fit.images_per_second:.0f} query images/s", "",
    ]
    for protocol, res in report["protocols"].items():
        extra = f"; prompt retrieval right for {100 * res['retrieval_accuracy']:.2f} % of test images" \
            if res.get("retrieval_accuracy") is not None else ""
        md += [f"## {protocol} protocol (fused map{extra})", "", res["markdown"], ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(portable(json.dumps(report, indent=2)))
    (out / "benchmark.md").write_text("\n".join(md))
    print(f"\ntraining: {fit.epochs} epochs in {fit.seconds:.0f} s, {fit.images_per_second:.0f} query images/s "
          f"on {report['device']}")


if __name__ == "__main__":
    main()
