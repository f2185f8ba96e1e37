"""Do the plain and the fast (batched) synthesis paths make the same distribution of pseudo-anomalies?

    python benchmarks/synthesis_stats.py                                   # iad-mix, 224 px, 4000 draws per path
    python benchmarks/synthesis_stats.py --input-size 64 --draws 8000 --set 'data.categories=[metal_plate, PA_BDP01_TL]'

The refiner is trained on these masks and images, so a shift between `synthesis.synthesize` (per image, numpy + PIL;
train.engine=plain) and `synthesis_batch.BatchSynthesizer` (per batch, torch; train.engine=fast) shifts what the two
engines learn. Both paths draw the same training images (uniformly, with the same texture folder) --draws times each;
per kind of anomaly and over all kinds this prints the mean of each statistic for both paths, their difference, and
the difference in standard errors (z; |z| > 4 is flagged, the draws being independent):

* share: how often the kind is drawn;  area: mask area as a fraction of the image;  empty: masks with no pixel;
* components / border: 4-connected pieces of the mask, and the fraction of mask pixels on its 4-neighbour boundary;
* change: mean |synthetic - image| over the mask's pixels and channels (0-255), i.e. the anomaly's contrast;
* gray-shift: mean signed change of gray level in the mask;  outside: pixels changed outside the mask (must be 0).

Writes synthesis-stats.json to --output.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from iad_mix import data_options, data_overrides, git_commit, portable  # noqa: E402

from onenip.api import make_config  # noqa: E402
from onenip.data import read_sources  # noqa: E402
from onenip.data.images import load_image, resize_image  # noqa: E402
from onenip.synthesis.batched import KIND_NAMES, BatchSynthesizer, load_texture_bank  # noqa: E402
from onenip.synthesis.per_image import FolderTextures, synthesize_details  # noqa: E402

STATS = ("area", "empty", "components", "border", "change", "gray_shift", "outside")


def components(mask: np.ndarray) -> int:
    """4-connected components of a (H, W) {0, 1} mask."""
    return int(ndimage.label(mask)[1])


def sample_stats(image: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Statistics of one synthesis: image and synthetic (H, W, 3) uint8, mask (H, W) {0, 1}."""
    m = mask.astype(bool)
    diff = synthetic.astype(np.int16) - image.astype(np.int16)  # (H, W, 3)
    gray = diff @ np.array([0.299, 0.587, 0.114])  # (H, W)
    n = int(m.sum())
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    eroded = -F.max_pool2d(-t, 3, 1, 1)  # 3x3 erosion (a superset of the 4-neighbour one; fine for a comparison)
    inner = int(eroded.sum())
    return {
        "area": n / m.size,
        "empty": float(n == 0),
        "components": float(components(m)) if n else 0.0,
        "border": (n - inner) / n if n else math.nan,
        "change": float(np.abs(diff[m]).mean()) if n else math.nan,
        "gray_shift": float(gray[m].mean()) if n else math.nan,
        "outside": float((np.abs(diff).sum(-1) > 0)[~m].mean()),
    }


def summarise(rows: list[dict[str, float]], kinds: list[str]) -> dict[str, dict[str, list[float]]]:
    """kind (and 'all') -> stat -> [mean, standard error, n]; plus share of each kind."""
    out: dict[str, dict[str, list[float]]] = {}
    total = len(rows)
    for kind in [*KIND_NAMES, "all"]:
        sel = [r for r, k in zip(rows, kinds) if kind in ("all", k)]
        entry: dict[str, list[float]] = {}
        share = len(sel) / total
        entry["share"] = [share, math.sqrt(share * (1 - share) / total), total]
        for s in STATS:
            v = np.array([r[s] for r in sel], dtype=np.float64)
            v = v[~np.isnan(v)]
            entry[s] = [float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))), len(v)] if len(v) > 1 else [
                math.nan, math.nan, len(v)]
        out[kind] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_options(ap)
    ap.add_argument("--draws", type=int, default=4000, help="syntheses per path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(REPO / "runs" / "synthesis-stats"))
    args = ap.parse_args()
    cfg = make_config(None, [*data_overrides(args), *args.set])
    size = cfg.data.input_size
    samples = read_sources(cfg.data.roots, "train", cfg.data.categories or None)
    images = np.stack([resize_image(load_image(s.image), size) for s in samples])  # (N, S, S, 3)
    rng = np.random.default_rng(args.seed)
    picks = rng.integers(len(images), size=args.draws)

    t0 = time.perf_counter()
    textures = FolderTextures(cfg.data.textures, cfg.synthesis.texture_resize)
    plain_rows, plain_kinds = [], []
    for i in picks:
        res = synthesize_details(images[i], rng, textures, cfg.synthesis)
        plain_rows.append(sample_stats(images[i], res.image, res.mask))
        plain_kinds.append(res.kind)
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    bank = load_texture_bank(cfg.data.textures, size, resize=cfg.synthesis.texture_resize)
    synth = BatchSynthesizer(cfg.synthesis, bank)
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    fast_rows, fast_kinds = [], []
    for start in range(0, args.draws, args.batch_size):
        idx = torch.from_numpy(picks[start : start + args.batch_size])
        res = synth.details(batch[idx], gen)
        out = res.image.permute(0, 2, 3, 1).numpy()
        for j, i in enumerate(idx.tolist()):
            fast_rows.append(sample_stats(images[i], out[j], res.mask[j, 0].numpy()))
            fast_kinds.append(KIND_NAMES[int(res.kind[j])])
    t_fast = time.perf_counter() - t0

    plain, fast = summarise(plain_rows, plain_kinds), summarise(fast_rows, fast_kinds)
    print(f"{len(samples)} training images of {len(set(s.category for s in samples))} categories at {size} px, "
          f"{args.draws} draws per path (plain {t_plain:.0f} s, fast {t_fast:.0f} s incl. statistics)")
    print(f"{'kind':7s} {'statistic':11s} {'plain':>9s} {'fast':>9s} {'fast-plain':>11s} {'z':>6s}")
    flagged = []
    for kind in [*KIND_NAMES, "all"]:
        for s in ("share", *STATS):
            (pm, pe, _), (fm, fe, _) = plain[kind][s], fast[kind][s]
            se = math.hypot(pe, fe)
            z = (fm - pm) / se if se > 0 else (0.0 if fm == pm else math.inf)
            flag = " <-" if abs(z) > 4 else ""
            if flag:
                flagged.append(f"{kind}/{s}")
            print(f"{kind:7s} {s:11s} {pm:9.4f} {fm:9.4f} {fm - pm:+11.4f} {z:6.1f}{flag}")
    print("flagged (|z| > 4):", ", ".join(flagged) or "none")
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": git_commit(),
              "input_size": size, "draws": args.draws, "train_images": len(samples), "plain": plain, "fast": fast,
              "flagged": flagged}
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "synthesis-stats.json.tmp"
    tmp.write_text(portable(json.dumps(report, indent=2)))
    tmp.replace(out_dir / "synthesis-stats.json")


if __name__ == "__main__":
    main()
