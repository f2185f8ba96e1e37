"""benchmarks/render_ablation.py: result files of ablation.py -> Table 4a with mean ± std, and the target checks;
benchmarks/render_results.py: a rerender of docs/benchmarks.md replaces its generated parts and keeps the rest."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
render_ablation = pytest.importorskip("render_ablation")
render_results = importlib.import_module("render_results")

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


# -- render_results.py: generated parts between markers, hand-written sections kept ----------------------------------


def page(*parts: str | tuple[str, list[str]]) -> str:
    """A page of hand-written text (str) and generated parts ((name, lines), with their markers)."""
    lines: list[str] = []
    for part in parts:
        lines += part.split("\n") if isinstance(part, str) else render_results.region_lines(*part)
    return "\n".join(lines)


def outside_markers(text: str) -> list[str]:
    """The lines of a page that no generated part holds."""
    out, inside = [], False
    for line in text.split("\n"):
        if line.startswith("<!-- generated "):
            inside = True
        elif line.startswith("<!-- end generated "):
            inside = False
        elif not inside:
            out.append(line)
    return out


HAND = "## Serving: `onenip serve` under load\n\nWritten by hand: 182.0 images/s.\n"


def test_rerender_updates_generated_parts_and_keeps_hand_written_sections() -> None:
    old = page("Preface by hand.\n", ("intro", ["# Benchmarks", "", "old intro", ""]), HAND,
               ("speed", ["## Speed", "", "| 1.0 |", ""]), "## Peers\n\nby hand, last\n")
    new = render_results.update_page(old, {"intro": ["# Benchmarks", "", "new intro", ""],
                                           "speed": ["## Speed", "", "| 2.0 |", "| 3.0 |\n| 4.0 |", ""]})
    assert outside_markers(new) == outside_markers(old)  # every hand-written line, in place and in order
    assert new.index("new intro") < new.index("Written by hand: 182.0") < new.index("| 2.0 |") < new.index("by hand, last")
    assert "old intro" not in new and "| 1.0 |" not in new and "| 4.0 |" in new
    assert render_results.update_page(new, {"intro": [], "speed": []}).count("Written by hand") == 1  # markers valid
    assert "<!-- generated speed: " in render_results.update_page(new, {"intro": [], "speed": []})


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.replace("| 1.0 |", "| 1.5 |"), r"'speed' \(lines 10-16\) were edited by hand"),
    (lambda p: p.replace("<!-- end generated speed -->", ""), "'speed' .* has no end marker"),
    (lambda p: p.replace("<!-- end generated intro -->\n", ""), "'speed' begins inside 'intro'"),
    (lambda p: p.replace("<!-- generated intro", "<!-- generated other"), "unknown generated part 'other'"),
    (lambda p: p + "\n" + page(("speed", [])), "'speed' stands in the page twice"),
    (lambda p: p.replace("generated speed:", "generated  speed:"), "malformed marker"),
    (lambda p: "\n".join(outside_markers(p)), r"no markers for the generated part\(s\) intro, speed; place the lines "
                                              r"'<!-- generated intro: .*\(sha256 e3b0c44298fc\) -->' and"),
])
def test_rerender_refuses_rather_than_lose_text(change: Callable[[str], str], message: str) -> None:
    old = change(page(("intro", ["# Benchmarks", ""]), HAND, ("speed", ["## Speed", "", "| 1.0 |", ""])))
    with pytest.raises(render_results.PageError, match=message):
        render_results.update_page(old, {"intro": ["# Benchmarks"], "speed": ["## Speed", "", "| 2.0 |"]})


def test_force_overwrites_a_hand_edit_of_a_generated_part() -> None:
    old = page(("speed", ["| 1.0 |"]), HAND).replace("| 1.0 |", "| 1.5 |")
    new = render_results.update_page(old, {"speed": ["| 2.0 |"]}, force=True)
    assert "| 1.5 |" not in new and "| 2.0 |" in new and outside_markers(new) == outside_markers(old)


def test_the_page_can_be_rendered_again_without_losing_a_line() -> None:
    """docs/benchmarks.md has the markers of every part the script writes, none of them edited by hand, and a
    rerender keeps every other line (the generators themselves are not run: they write plots)."""
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    names = list(render_results.REGIONS)
    again = render_results.update_page(text, {name: [f"({name})"] for name in names})
    assert outside_markers(again) == outside_markers(text)
    assert all(f"({name})" in again for name in names)
    for title in ("## Summaries and measurements quoted in the other pages", "## Serving: `onenip serve` under load",
                  "## Known and unknown products", "## New product types without retraining"):
        assert title in outside_markers(text)


def test_renderers_spell_the_metrics_as_evaluation_does() -> None:
    """render_results.py and compare_runs.py keep their own spelling of the metric keys and names (they need no
    torch); it is onenip.evaluation.evaluate's."""
    from onenip.evaluation.evaluate import METRIC_NAMES, METRICS

    compare_runs = pytest.importorskip("compare_runs")
    for module in (render_results, compare_runs):
        assert tuple(module.KEYS) == METRICS and tuple(module.NAMES) == METRIC_NAMES
