"""Mean +- std over seeds of groups of benchmarks/ablation.py runs, and whether the groups agree.

    python benchmarks/compare_runs.py --group runs/fvp/cpu-plain-row5-seed*.json --group runs/fvp/cpu-fast-row5-seed*.json

Each group is a list of result JSON files (one per seed). For every protocol (and K of K-prompt fusion) it prints the
mean and standard deviation (over seeds) of the seven mean metrics of each group, and, for two groups, the difference of
the means next to the seed-to-seed spread: a difference within max(std of either group) is "within spread"; and
Welch's t (the difference over its standard error): |t| of about 2 or more is unlikely (about 5 %) if the two groups
come from the same distribution, but the seven metrics are correlated and several are tested at once, so one |t| near
2 alone is weak evidence.
With --markdown FILE the table is also written there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# onenip.evaluation.evaluate's METRICS and METRIC_NAMES, spelled here so that this script needs no torch (a test checks
# that they agree)
KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")


def load_group(files: list[str]) -> dict[tuple[str, int], list[dict[str, float]]]:
    """(protocol, K) -> one dict of mean fused metrics per run."""
    out: dict[tuple[str, int], list[dict[str, float]]] = {}
    for f in files:
        d = json.loads(Path(f).read_text())
        for ev in d["evaluations"]:
            out.setdefault((ev["protocol"], ev["prompts"]), []).append(ev["mean"]["fused"])
    return out


def stats(runs: list[dict[str, float]], key: str) -> tuple[float, float]:
    vals = [100 * r[key] for r in runs]
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def welch_t(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> float:
    """(mean b − mean a) / its standard error, from the two groups' sample variances; nan for fewer than 2 runs each."""
    (ma, sa), (mb, sb) = stats(a, key), stats(b, key)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    se = (sa**2 / len(a) + sb**2 / len(b)) ** 0.5
    return (mb - ma) / se if se > 0 else (0.0 if mb == ma else float("inf"))


def compare_table(groups: list[list[str]], names: list[str]) -> str:
    """The Markdown tables: per protocol and K, mean ± std of each group and (two groups) their difference."""
    data = [load_group(g) for g in groups]
    lines = []
    for setting in sorted(set.intersection(*(set(d) for d in data))):
        protocol, k = setting
        lines += [f"#### {protocol} protocol, K = {k}", "", "| group (seeds) | " + " | ".join(NAMES) + " |",
                  "|---|" + "---:|" * len(NAMES)]
        for name, d in zip(names, data):
            cells = [f"{m:.1f} ± {s:.1f}" for m, s in (stats(d[setting], key) for key in KEYS)]
            lines.append(f"| {name} ({len(d[setting])}) | " + " | ".join(cells) + " |")
        if len(data) == 2:
            cells = []
            for key in KEYS:
                (ma, sa), (mb, sb) = stats(data[0][setting], key), stats(data[1][setting], key)
                spread = max(sa, sb)
                cells.append(f"{mb - ma:+.1f} ({'within' if abs(mb - ma) <= spread else 'OUTSIDE'} ±{spread:.1f})")
            lines.append(f"| {names[1]} − {names[0]} | " + " | ".join(cells) + " |")
            lines.append("| Welch t | " + " | ".join(
                f"{welch_t(data[0][setting], data[1][setting], key):+.1f}" for key in KEYS) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", action="append", nargs="+", required=True, metavar="FILE",
                    help="result files of one group (one per seed); repeat for each group")
    ap.add_argument("--names", nargs="+", help="names of the groups (default: A, B, ...)")
    ap.add_argument("--markdown", help="also write the table to this file")
    argv = ap.parse_args()
    names = argv.names or [chr(ord("A") + i) for i in range(len(argv.group))]
    text = compare_table(argv.group, names)
    print(text)
    if argv.markdown:
        Path(argv.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
