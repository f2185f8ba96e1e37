"""benchmarks/render_ablation.py: result files of ablation.py -> Table 4a with mean ± std, and the target checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
render_ablation = pytest.importorskip("render_ablation")

KEYS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"]


def run(row: int, seed: int, i_auroc: float, p_ap: float, paper_i_auroc: float | None = None,
        retrieval: float | None = 1.0) -> dict:
    def metrics(ia: float) -> dict:
        return {k: 0.5 for k in KEYS} | {"image_auroc": ia, "pixel_ap": p_ap}

    def ev(protocol: str, ia: float) -> dict:
        return {"protocol": protocol, "prompts": 1, "retrieval_accuracy": retrieval if protocol == "clean" else None,
                "categories": {"a": {"fused": metrics(ia)}, "b": {"fused": metrics(ia)}}, "mean": {"fused": metrics(ia)}}

    return {"row": row, "seed": seed, "commit": "abc", "device": "cpu", "torch": "x", "command": "c", "epochs": 3,
            "train_seconds": 1.0, "history": [],
            "config": {"data": {"input_size": 64}, "backbone": {"name": "b", "weights": "w"}, "model": {"hidden_dim": 8},
                       "train": {"batch_size": 2, "engine": "fast"}},
            "evaluations": [ev("clean", i_auroc), ev("paper", paper_i_auroc if paper_i_auroc is not None else i_auroc)]}


def write(folder: Path, runs: list[dict], tag: str = "") -> None:
    folder.mkdir(exist_ok=True)
    for r in runs:
        (folder / f"{tag}{'-' if tag else ''}row{r['row']}-seed{r['seed']}.json").write_text(json.dumps(r))


def verdicts(lines: list[str]) -> dict[str, str]:
    """statement -> 'yes' / '**no**' from the checks table."""
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[2]
    return out


def test_table_shows_mean_and_std_over_seeds(tmp_path: Path) -> None:
    write(tmp_path, [run(0, 1, 0.90, 0.40), run(0, 2, 0.92, 0.44), run(5, 1, 0.95, 0.60)])
    rows = render_ablation.load(tmp_path)[""]
    table = render_ablation.table_4a(rows, "clean")
    assert table[2].startswith("| 0 UniAD | 91.0 ± 1.4 |")  # mean and sample std of 90, 92
    assert "| 40.0 ± 0.0 |" not in table[2] and "42.0 ± 2.8" in table[2]
    assert table[3].startswith("| 5 full OneNIP (+ refiner) | 95.0 |") and "| 100.00 % | 1 |" in table[3]


def test_checks_report_targets_met_and_missed(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write(good, [run(0, 1, 0.90, 0.40), run(5, 1, 0.95, 0.55, paper_i_auroc=0.955, retrieval=0.995)])
    v = verdicts(render_ablation.checks(render_ablation.load(good)[""]))
    assert v["target: full OneNIP − UniAD, mean P-AP (clean) ≥ +10"] == "yes"  # +15
    assert v["target: full OneNIP > UniAD, mean I-AUROC (clean)"] == "yes"
    assert v["target: clean − paper protocol, mean I-AUROC of full OneNIP ≥ −1"] == "yes"  # -0.5
    assert v["target: prompt retrieval right for ≥ 99 % of test images (full OneNIP)"] == "yes"

    bad = tmp_path / "bad"
    write(bad, [run(0, 1, 0.96, 0.50), run(5, 1, 0.95, 0.55, paper_i_auroc=0.97, retrieval=0.98)])
    v = verdicts(render_ablation.checks(render_ablation.load(bad)[""]))
    assert v["target: full OneNIP − UniAD, mean P-AP (clean) ≥ +10"] == "**no**"  # +5
    assert v["target: full OneNIP > UniAD, mean I-AUROC (clean)"] == "**no**"
    assert v["target: clean − paper protocol, mean I-AUROC of full OneNIP ≥ −1"] == "**no**"  # -2
    assert v["target: prompt retrieval right for ≥ 99 % of test images (full OneNIP)"] == "**no**"


def test_settings_are_grouped_by_tag(tmp_path: Path) -> None:
    write(tmp_path, [run(5, 1, 0.95, 0.55), run(0, 1, 0.9, 0.4)])
    write(tmp_path, [run(5, 1, 0.97, 0.58)], tag="256px")
    by_tag = render_ablation.load(tmp_path)
    assert set(by_tag) == {"", "256px"} and list(by_tag[""]) == [0, 5]
    other = "\n".join(render_ablation.other_settings(by_tag))
    assert "| (main) | 64 | 95.0 |" in other and "| 256px | 64 | 97.0 |" in other


def test_compare_table_difference_spread_and_welch_t(tmp_path: Path) -> None:
    compare_runs = pytest.importorskip("compare_runs")
    files = {}
    for name, values in (("plain", [0.90, 0.92, 0.94]), ("fast", [0.86, 0.87, 0.88])):
        files[name] = []
        for seed, v in enumerate(values):
            r = run(5, seed, v, 0.5)
            f = tmp_path / f"{name}-row5-seed{seed}.json"
            f.write_text(json.dumps(r))
            files[name].append(str(f))
    text = compare_runs.compare_table([files["plain"], files["fast"]], ["plain", "fast"])
    lines = text.splitlines()
    diff = next(line for line in lines if line.startswith("| fast − plain"))
    # means 92 and 87, stds 2 and 1: −5 is outside the larger spread 2; Welch t = −5 / sqrt(4/3 + 1/3) = −3.87
    assert diff.split("|")[2].strip() == "-5.0 (OUTSIDE ±2.0)"
    assert "+0.0 (within ±0.0)" in diff  # P-AP is 50 in every run
    t = next(line for line in lines if line.startswith("| Welch t"))
    assert t.split("|")[2].strip() == "-3.9"
    assert t.split("|")[5].strip() == "+0.0"


def test_curve_averages_only_the_runs_that_logged_one(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = []
    for seed, (p1, p2, final) in enumerate([(0.30, 0.40, 0.50), (0.40, 0.50, 0.70), (None, None, 0.90)], start=1):
        r = run(0, seed, 0.9, final)
        if p1 is not None:  # test metrics logged at epochs 1 and 2; the final evaluation is epoch 3
            r["history"] = [{"epoch": e, "test_image_auroc": 0.9, "test_pixel_ap": p, "test_pixel_aupro": 0.5}
                            for e, p in ((1, p1), (2, p2))]
        runs.append(r)
    table = render_ablation.curves({0: runs}, tmp_path / "curves.png")
    assert table[2] == "| row 0 | 35.0 | 45.0 | 60.0 |"  # seed 3 (no curve) would pull epoch 3 to 70.0
    assert (tmp_path / "curves.png").stat().st_size > 0
