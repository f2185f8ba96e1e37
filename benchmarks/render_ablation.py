"""Markdown tables and plots of a folder of `benchmarks/ablation.py` results (used by render_results.py).

    python benchmarks/render_ablation.py docs/results/ablation-cpu      # prints the section, writes curves.png there

A folder holds one JSON per run, named <tag>-row<R>-seed<S>.json (tag may be empty). Runs with the same tag form one
setting (e.g. the 224-px ablation and a 256-px tag); runs of one row and setting with several seeds are shown as
mean ± std over seeds. What is rendered, all from the files:

- Table 4a: the seven mean metrics of the fused map per row, per protocol (K = 1), with retrieval accuracy;
- the issue's targets and the paper's claims about the rows, each checked against the measured means;
- I-AUROC and P-AP per category and row (clean protocol);
- Fig. 1b: the clean-protocol test metrics against epochs of the runs trained with --curve-every (PNG, matplotlib);
- K-prompt fusion (--prompts) and other settings of the same row (e.g. 256-px input) beside the main setting.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import KEYS, NAMES  # noqa: E402

ROW_NAMES = {0: "UniAD", 1: "static prompt", 2: "dynamic prompt", 3: "restoration, no prompt",
             4: "dynamic prompt + restoration", 5: "full OneNIP (+ refiner)"}
# The paper's Table 4a (MVTec AD, its own backbone and schedule): I-ROC, P-ROC, I-PR, P-PR per line. Quoted, not ours.
PAPER_4A = {0: (96.5, 96.8, 98.9, 44.7), 1: (96.8, 97.0, 98.9, 45.8), 2: (97.5, 97.1, 99.2, 46.0),
            3: (96.7, 97.0, 98.9, 46.5), 4: (97.4, 97.3, 99.1, 48.4), 5: (97.9, 97.9, 99.3, 63.7)}
FILE = re.compile(r"^(?:(?P<tag>.*)-)?row(?P<row>\d+)-seed(?P<seed>-?\d+)\.json$")


def load(folder: Path) -> dict[str, dict[int, list[dict]]]:
    """tag -> row -> the runs (parsed JSON, sorted by seed)."""
    runs: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(folder.glob("*.json")):
        m = FILE.match(f.name)
        if m:
            d = json.loads(f.read_text())
            d["_file"] = f.name
            runs[m["tag"] or ""][int(m["row"])].append(d)
    for rows in runs.values():
        for lst in rows.values():
            lst.sort(key=lambda d: d["seed"])
    return {tag: dict(sorted(rows.items())) for tag, rows in runs.items()}


def evaluation(run: dict, protocol: str, k: int = 1) -> dict | None:
    return next((e for e in run["evaluations"] if e["protocol"] == protocol and e["prompts"] == k), None)


def metric(runs: list[dict], protocol: str, key: str, k: int = 1, category: str | None = None) -> list[float]:
    """The metric (in %) of the fused map of each run: the mean over categories, or one category's."""
    out = []
    for r in runs:
        e = evaluation(r, protocol, k)
        if e is not None:
            out.append(100 * (e["categories"][category]["fused"][key] if category else e["mean"]["fused"][key]))
    return out


def mean(vals: list[float]) -> float:
    return statistics.fmean(vals) if vals else float("nan")


def cell(vals: list[float]) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def retrieval_values(runs: list[dict], k: int = 1) -> list[float]:
    """The clean protocol's retrieval accuracy (in %) of each run that retrieves prompts."""
    return [100 * e["retrieval_accuracy"] for r in runs if (e := evaluation(r, "clean", k)) is not None
            and e.get("retrieval_accuracy") is not None]


def retrieval(runs: list[dict], k: int = 1) -> str:
    vals = retrieval_values(runs, k)
    return f"{mean(vals):.2f} %" if vals else "—"


def table_4a(rows: dict[int, list[dict]], protocol: str) -> list[str]:
    out = ["| row | " + " | ".join(NAMES) + " | retrieval | seeds | train s |",
           "|---|" + "---:|" * (len(NAMES) + 3)]
    for row, runs in rows.items():
        cells = " | ".join(cell(metric(runs, protocol, key)) for key in KEYS)
        ret = retrieval(runs) if protocol == "clean" else "—"
        secs = mean([r["train_seconds"] for r in runs])
        out.append(f"| {row} {ROW_NAMES.get(row, '')} | {cells} | {ret} | {len(runs)} | {secs:.0f} |")
    return out


def checks(rows: dict[int, list[dict]]) -> list[str]:
    """The issue's targets and the paper's statements about Table 4a, each against the measured means (clean, K=1)."""

    def m(row: int, key: str, protocol: str = "clean") -> float:
        return mean(metric(rows.get(row, []), protocol, key))

    out = ["| statement | measured | holds |", "|---|---|:---:|"]

    def add(text: str, value: str, ok: bool | None) -> None:
        out.append(f"| {text} | {value} | {'—' if ok is None else ('yes' if ok else '**no**')} |")

    def known(*vals: float) -> bool:
        return all(v == v for v in vals)  # not NaN

    if known(m(5, "pixel_ap"), m(0, "pixel_ap")):
        d = m(5, "pixel_ap") - m(0, "pixel_ap")
        add("target: full OneNIP − UniAD, mean P-AP (clean) ≥ +10", f"{d:+.1f}", d >= 10)
        d = m(5, "image_auroc") - m(0, "image_auroc")
        add("target: full OneNIP > UniAD, mean I-AUROC (clean)", f"{d:+.1f}", d > 0)
    if known(m(5, "image_auroc"), m(5, "image_auroc", "paper")):
        d = m(5, "image_auroc") - m(5, "image_auroc", "paper")
        add("target: clean − paper protocol, mean I-AUROC of full OneNIP ≥ −1", f"{d:+.1f}", d >= -1)
    ret = retrieval_values(rows.get(5, []))
    if ret:
        add("target: prompt retrieval right for ≥ 99 % of test images (full OneNIP)", f"{mean(ret):.2f} %",
            mean(ret) >= 99)
    for a, b, what in ((0, 1, "static prompt improves on UniAD (P-AP)"), (0, 2, "dynamic prompt improves on UniAD (P-AP)"),
                       (1, 2, "dynamic beats static prompt (P-AP)"), (2, 4, "restoration improves the dynamic prompt (P-AP)"),
                       (4, 5, "the refiner improves P-AP")):
        if known(m(a, "pixel_ap"), m(b, "pixel_ap")):
            d = m(b, "pixel_ap") - m(a, "pixel_ap")
            paper = PAPER_4A[b][3] - PAPER_4A[a][3]
            add(f"paper: {what}: row {b} − row {a} (paper {paper:+.1f})", f"{d:+.1f}", d > 0)
    if all(known(m(r, "pixel_ap")) for r in (0, 2, 3, 4)):
        gain_uniad, gain_prompt = m(3, "pixel_ap") - m(0, "pixel_ap"), m(4, "pixel_ap") - m(2, "pixel_ap")
        add("paper: restoration gains less without prompt (P-AP): (row 3 − row 0) < (row 4 − row 2) "
            f"(paper {PAPER_4A[3][3] - PAPER_4A[0][3]:+.1f} < {PAPER_4A[4][3] - PAPER_4A[2][3]:+.1f})",
            f"{gain_uniad:+.1f} vs {gain_prompt:+.1f}", gain_uniad < gain_prompt)
    if all(known(m(r, "image_auroc")) for r in (0, 2)):
        d = m(2, "image_auroc") - m(0, "image_auroc")
        add(f"paper: dynamic prompt improves I-AUROC: row 2 − row 0 (paper {PAPER_4A[2][0] - PAPER_4A[0][0]:+.1f})",
            f"{d:+.1f}", d > 0)
    return out


def per_category(rows: dict[int, list[dict]]) -> list[str]:
    first = next(iter(rows.values()))[0]
    cats = list(evaluation(first, "clean")["categories"])
    out = ["| category | " + " | ".join(f"{r}: I-AUROC / P-AP" for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for c in cats:
        out.append(f"| {c} | " + " | ".join(f"{mean(metric(runs, 'clean', 'image_auroc', category=c)):.1f} / "
                                           f"{mean(metric(runs, 'clean', 'pixel_ap', category=c)):.1f}"
                                           for runs in rows.values()) + " |")
    return out


def curves(rows: dict[int, list[dict]], path: Path) -> list[str]:
    """Fig. 1b: mean over seeds of the test metrics logged every --curve-every epochs; writes a PNG."""
    def has_curve(r: dict) -> bool:
        return any("test_image_auroc" in h for h in r["history"])

    # only the runs that logged a curve: a run without one would add its end point alone
    logged = {row: [r for r in runs if has_curve(r)] for row, runs in rows.items() if any(map(has_curve, runs))}
    if not logged:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("the plots need matplotlib: pip install -e '.[bench]'") from exc
    panels = [("test_image_auroc", "image AUROC"), ("test_pixel_ap", "pixel AP"), ("test_pixel_aupro", "AUPRO")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), constrained_layout=True)
    table: dict[int, dict[int, list[float]]] = {}
    for row, runs in logged.items():
        for ax, (key, title) in zip(axes, panels):
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for r in runs:
                for h in r["history"]:
                    if key in h:
                        by_epoch[h["epoch"]].append(100 * h[key])
                final = evaluation(r, "clean")
                logged_last = any(key in h and h["epoch"] == r["epochs"] for h in r["history"])
                if final is not None and not logged_last:  # each run's last point: its final evaluation
                    by_epoch[r["epochs"]].append(100 * final["mean"]["fused"][key.removeprefix("test_")])
            epochs = sorted(by_epoch)
            ys = [mean(by_epoch[e]) for e in epochs]
            seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            ax.plot(epochs, ys, marker="o", ms=3, label=f"row {row}: {ROW_NAMES.get(row, row)} ({seeds})")
            if len(runs) > 1:
                sd = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
                ax.fill_between(epochs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2)
            ax.set_title(title + " (clean protocol, test set)", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if key == "test_pixel_ap":
                table[row] = {e: y for e, y in zip(epochs, ys)}
    axes[0].legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    epochs = sorted({e for t in table.values() for e in t})
    out = ["| P-AP at epoch | " + " | ".join(str(e) for e in epochs) + " |", "|---|" + "---:|" * len(epochs)]
    for row, t in table.items():
        out.append(f"| row {row} | " + " | ".join(f"{t[e]:.1f}" if e in t else "—" for e in epochs) + " |")
    return out


def k_prompts(rows: dict[int, list[dict]]) -> list[str]:
    out = []
    for row, runs in rows.items():
        ks = sorted({e["prompts"] for r in runs for e in r["evaluations"]})
        if len(ks) < 2:
            continue
        # only the runs evaluated with every K, so that the rows of the table compare the same models
        runs = [r for r in runs if {e["prompts"] for e in r["evaluations"]} >= set(ks)]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        out += [f"Row {row} ({ROW_NAMES.get(row, '')}), maps of the K prompts averaged (seed {seeds}):", "",
                "| protocol | K | " + " | ".join(NAMES) + " | retrieval |", "|---|---:|" + "---:|" * (len(NAMES) + 1)]
        for protocol in ("clean", "paper"):
            for k in ks:
                cells = " | ".join(cell(metric(runs, protocol, key, k)) for key in KEYS)
                out.append(f"| {protocol} | {k} | {cells} | {retrieval(runs, k) if protocol == 'clean' else '—'} |")
        out.append("")
    return out


def other_settings(runs_by_tag: dict[str, dict[int, list[dict]]]) -> list[str]:
    """Each row measured in more than one setting (tag): the clean-protocol means side by side."""
    out = []
    rows = sorted({row for rows in runs_by_tag.values() for row in rows})
    for row in rows:
        tags = [t for t, rs in runs_by_tag.items() if row in rs]
        if len(tags) < 2:
            continue
        out += [f"Row {row} ({ROW_NAMES.get(row, '')}) in each setting (clean protocol, K = 1):", "",
                "| setting | input px | " + " | ".join(NAMES) + " | train s |", "|---|---:|" + "---:|" * (len(NAMES) + 1)]
        for t in tags:
            runs = runs_by_tag[t][row]
            size = runs[0]["config"]["data"]["input_size"]
            out.append(f"| {t or '(main)'} | {size} | " + " | ".join(cell(metric(runs, 'clean', key)) for key in KEYS)
                       + f" | {mean([r['train_seconds'] for r in runs]):.0f} |")
        out.append("")
    return out


def ablation_section(folder: Path, main_tag: str | None = None, link_prefix: str = "results") -> list[str]:
    """The Markdown of one ablation folder; writes <folder>/curves.png when curves were logged."""
    runs_by_tag = load(folder)
    if not runs_by_tag:
        return []
    tag = main_tag if main_tag is not None else max(runs_by_tag, key=lambda t: len(runs_by_tag[t]))
    rows = runs_by_tag[tag]
    first = next(iter(rows.values()))[0]
    cfg = first["config"]
    commits = sorted({r["commit"] for rs in runs_by_tag.values() for runs in rs.values() for r in runs})
    devices = sorted({r["device"] for rs in runs_by_tag.values() for runs in rs.values() for r in runs})
    commands = sorted({r["command"] for rs in runs_by_tag.values() for runs in rs.values() for r in runs})
    engines = sorted({r["config"]["train"]["engine"] for runs in rows.values() for r in runs})  # one, unless a fallback
    rel = f"{link_prefix}/{folder.name}"
    out = [f"- result files: `docs/{rel}/`; commit {', '.join(commits)}; {'; '.join(devices)}; torch {first['torch']}",
           f"- setting: {len(evaluation(first, 'clean')['categories'])} categories, {cfg['data']['input_size']} px, "
           f"{cfg['backbone']['name']} ({cfg['backbone']['weights']}), width {cfg['model']['hidden_dim']}, "
           f"{first['epochs']} epochs at batch {cfg['train']['batch_size']}, engine {', '.join(engines)}"
           + (" (which row used which: the commands)" if len(engines) > 1 else ""),
           "- commands:", *[f"  - `{c}`" for c in commands], ""]
    for protocol in ("clean", "paper"):
        out += [f"#### Table 4a, {protocol} protocol (fused map, mean over categories)", "", *table_4a(rows, protocol), ""]
    out += ["The paper's Table 4a (MVTec AD, its backbone and 1000 epochs; quoted for the ranking, not comparable):", "",
            "| row | I-AUROC | P-AUROC | I-AP | P-AP |", "|---|---:|---:|---:|---:|",
            *[f"| {r} {ROW_NAMES[r]} | " + " | ".join(str(x) for x in v) + " |" for r, v in PAPER_4A.items()],
            "", "#### Targets and the paper's statements, checked", "", *checks(rows), "",
            "#### Per category (clean protocol; mean over seeds)", "", *per_category(rows), ""]
    curve = curves(rows, folder / "curves.png")
    if curve:
        out += ["#### Test metrics against epochs (Fig. 1b)", "", f"![test metrics against epochs]({rel}/curves.png)", "",
                *curve, ""]
    k = k_prompts(rows)
    if k:
        out += ["#### K-prompt fusion", "", *k]
    other = other_settings(runs_by_tag)
    if other:
        out += ["#### Other settings", "", *other]
    return out


if __name__ == "__main__":
    print("\n".join(ablation_section(Path(sys.argv[1]))))
