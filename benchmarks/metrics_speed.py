"""Speed of onenip.metrics at MVTec AD scale, on synthetic data.

Default: 15 categories x 115 maps x 224 x 224 (86.6 M pixels, about 3 % positive), like the MVTec AD test set.
Each category's maps are smooth random fields with elliptic (slightly ragged) defect blobs, raised inside the blobs
so the metrics are neither trivial nor random; image scores are the map maxima. Per category it times the four
pixel metrics (``pixel_metrics``: AUROC, AP, F1-max, AUPRO) and the three image metrics (``image_metrics``), prints a
table and the peak resident memory. It asserts nothing.

Run:  python benchmarks/metrics_speed.py [--categories 15] [--maps 115] [--size 224] [--seed 0]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
from scipy import ndimage

from onenip.evaluation.metrics import image_metrics, pixel_metrics


def make_category(rng: np.random.Generator, n_maps: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (maps float32, masks bool) for one category, about 3 % positive pixels, 70 % defective images."""
    scale = size / 224.0
    coarse = max(size // 16, 2)
    zoom = (1.0, size / coarse, size / coarse)
    background = ndimage.zoom(rng.standard_normal((n_maps, coarse, coarse)).astype(np.float32), zoom, order=1)
    ragged = ndimage.zoom(rng.standard_normal((n_maps, coarse, coarse)).astype(np.float32), zoom, order=1)
    maps = background + 0.35 * rng.standard_normal((n_maps, size, size), dtype=np.float32)
    masks = np.zeros((n_maps, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n_maps):
        if rng.random() > 0.7:
            continue  # a good image
        for _ in range(int(rng.integers(1, 4))):
            a, b = rng.uniform(7, 32, size=2) * scale
            cy, cx = rng.uniform(0, size, size=2)
            blob = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 + 0.25 * ragged[i] < 1.0
            masks[i] |= blob
            maps[i][blob] += rng.uniform(0.5, 2.5)
    return maps, masks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", type=int, default=15, help="number of categories (default 15)")
    parser.add_argument("--maps", type=int, default=115, help="anomaly maps per category (default 115)")
    parser.add_argument("--size", type=int, default=224, help="map height = width in pixels (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    header = (
        f"{'cat':>4} {'pos %':>6} {'gen s':>7} {'pixel s':>8} {'image s':>8} "
        f"{'P-AUROC':>8} {'P-AP':>6} {'P-F1':>6} {'AUPRO':>6} {'I-AUROC':>8} {'I-AP':>6} {'I-F1':>6}"
    )
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}; "
          f"{args.categories} categories x {args.maps} maps x {args.size}x{args.size}")
    print(header)
    print("-" * len(header))
    total_gen = total_pixel = total_image = 0.0
    total_pixels = total_pos = 0
    for c in range(args.categories):
        t0 = time.perf_counter()
        maps, masks = make_category(rng, args.maps, args.size)
        labels = masks.reshape(len(masks), -1).any(axis=1)
        scores = maps.reshape(len(maps), -1).max(axis=1)
        t1 = time.perf_counter()
        pix = pixel_metrics(maps, masks)
        t2 = time.perf_counter()
        img = image_metrics(scores, labels)
        t3 = time.perf_counter()
        total_gen += t1 - t0
        total_pixel += t2 - t1
        total_image += t3 - t2
        n_pos = int(np.count_nonzero(masks))
        total_pixels += masks.size
        total_pos += n_pos
        print(
            f"{c:>4} {100 * n_pos / masks.size:>6.2f} {t1 - t0:>7.3f} {t2 - t1:>8.3f} {t3 - t2:>8.4f} "
            f"{pix['auroc']:>8.4f} {pix['ap']:>6.3f} {pix['f1_max']:>6.3f} {pix['aupro']:>6.3f} "
            f"{img['auroc']:>8.4f} {img['ap']:>6.3f} {img['f1_max']:>6.3f}"
        )
        del maps, masks
    print("-" * len(header))
    print(f"pixels: {total_pixels / 1e6:.1f} M ({100 * total_pos / max(total_pixels, 1):.2f} % positive)")
    print(f"data generation (not metrics): {total_gen:8.3f} s")
    print(f"pixel metrics (AUROC, AP, F1, AUPRO): {total_pixel:8.3f} s")
    print(f"image metrics (AUROC, AP, F1):        {total_image:8.3f} s")
    print(f"TOTAL metrics, all categories:        {total_pixel + total_image:8.3f} s")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"peak RSS: {peak_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
