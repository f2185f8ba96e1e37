"""Diagnostic benchmark scripts that are more than printing: benchmarks/prompt_sensitivity.py; the helpers every
benchmark shares (benchmarks/iad_mix.py); and helpers whose mistakes would go into recorded results
(prompt_fusion.py's --combine, unknown_types.py's --trained model check)."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import pytest
import torch
from conftest import GEN_TEST

from onenip.api import make_config
from onenip.data import read_sources
from onenip.models.detector import Detector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
prompt_sensitivity = pytest.importorskip("prompt_sensitivity")
iad_mix = pytest.importorskip("iad_mix")
prompt_fusion = pytest.importorskip("prompt_fusion")
unknown_types = pytest.importorskip("unknown_types")

TWO = ["bracket", "grain"]  # two generated categories


def test_other_prompts_come_from_another_category_and_repeat(gen_data: Path) -> None:
    test = read_sources([str(gen_data)], "test", TWO)
    train = read_sources([str(gen_data)], "train", TWO)
    other = prompt_sensitivity.other_prompts(test, train, seed=3)
    assert all(p.category != s.category for p, s in zip(other, test))
    assert other == prompt_sensitivity.other_prompts(test, train, seed=3)
    assert other != prompt_sensitivity.other_prompts(test, train, seed=4)
    with pytest.raises(ValueError, match="two categories"):
        prompt_sensitivity.other_prompts(test[:1], [s for s in train if s.category == test[0].category], seed=0)


def test_sensitivity_of_an_untrained_prompted_model(tmp_path: Path, gen_data: Path) -> None:
    cfg = make_config(None, [f"data.roots=[{gen_data}]", f"data.categories=[{', '.join(TWO)}]", "data.input_size=32",
                             "data.workers=0", "backbone.name=tf_efficientnet_lite0", "backbone.weights=random",
                             "model.hidden_dim=32", "model.ffn_dim=64", "model.heads=4", "model.refiner_channels=8",
                             "train.device=cpu"])
    torch.manual_seed(0)
    det = Detector.build(cfg)
    det.save(tmp_path / "model.safetensors")
    res = prompt_sensitivity.sensitivity(tmp_path, None, torch.device("cpu"), seed=0)
    assert res["test_images"] == 2 * GEN_TEST and set(res["modes"]) == {"same", "other", "self", "gray"}
    for mode, maps in res["modes"].items():
        assert set(maps) == {"rec", "ref"}
        for m in maps.values():
            assert set(m["categories"]) == set(TWO)
            assert all(0.0 <= v <= 1.0 for v in m["mean"].values())
            if mode == "same":
                assert m["relative_change"] == 0.0
            else:  # the decoder attends to the prompt, so another prompt moves the maps even untrained
                assert m["relative_change"] > 1e-4


def test_ablation_sensitivity_flag_writes_the_prompt_sensitivity(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ablation.py --sensitivity (what gpu_session.sh runs on rows 2 and 5) adds the four prompts' metrics to a prompted
    row's result file, and only to a prompted row's."""
    ablation = pytest.importorskip("ablation")
    monkeypatch.setattr(sys, "argv", [
        "ablation.py", "--rows", "0", "2", "--seeds", "1", "--epochs", "1", "--engine", "plain", "--sensitivity",
        "--data", str(gen_data), "--textures", str(gen_textures), "--weights", "random", "--input-size", "32",
        "--batch-size", "8", "--workers", "0", "--output", str(tmp_path),
        "--set", f"data.categories=[{', '.join(TWO)}]", "--set", "model.hidden_dim=32", "--set", "model.ffn_dim=64",
        "--set", "model.heads=4", "--set", "train.device=cpu"])
    ablation.main()
    uniad = json.loads((tmp_path / "row0-seed1.json").read_text())
    prompted = json.loads((tmp_path / "row2-seed1.json").read_text())
    assert "prompt_sensitivity" not in uniad
    modes = prompted["prompt_sensitivity"]
    assert set(modes) == {"same", "other", "self", "gray"} and modes["same"]["rec"]["relative_change"] == 0.0
    assert modes["other"]["rec"]["relative_change"] > 0.0
    # the "same" prompt is the paper protocol's draw: its rec-map metrics are those evaluate() reported for K = 1 (to
    # float rounding: the two batch the maps differently)
    paper = next(e for e in prompted["evaluations"] if e["protocol"] == "paper" and e["prompts"] == 1)
    assert modes["same"]["rec"]["mean"] == pytest.approx(paper["mean"]["rec"], abs=1e-5)
    assert modes["other"]["rec"]["mean"] != pytest.approx(paper["mean"]["rec"], abs=1e-5)


def test_category_mean_is_the_mean_over_the_categories_where_a_metric_is_defined() -> None:
    """iad_mix.category_mean (the per-category mean of every benchmark) gives `Results.mean`'s numbers, skips nan (a
    category without masks), is nan where no category has the metric, and takes a subset of the metrics."""
    from onenip.evaluation.evaluate import METRICS, Results

    cats = {"a": dict(zip(METRICS, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])),
            "b": dict(zip(METRICS, [0.5, 0.4, 0.3, math.nan, math.nan, math.nan, math.nan])),
            "c": {**dict(zip(METRICS, [0.1, 0.2, 0.3, 0.2, 0.1, 0.2, 0.1])), "images": 12}}  # other keys are ignored
    mean = iad_mix.category_mean(cats)
    want = Results(protocol="clean", categories={c: {"fused": v} for c, v in cats.items()}, fusion_scale=None,
                   retrieval_accuracy=None).mean("fused")
    assert list(mean) == list(METRICS) and mean == want
    assert mean["image_auroc"] == pytest.approx(0.5) and mean["pixel_auroc"] == pytest.approx(0.4)  # b left out
    assert iad_mix.category_mean(list(cats.values())) == mean  # the dicts alone
    assert iad_mix.category_mean([cats["a"]], METRICS[:3]) == {m: cats["a"][m] for m in METRICS[:3]}
    assert math.isnan(iad_mix.category_mean([cats["b"]])["pixel_ap"])


def test_cpu_name_and_iad_mix_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CPU's model name as /proc/cpuinfo has it (else the platform's names); iad-mix under $ONENIP_DATA when set,
    else under shared/data beside the repository, and the data options' defaults from it."""
    import argparse

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Foo CPU @ 2.0GHz\nmodel name\t: Bar\n")
    assert iad_mix.cpu_name(info) == "Foo CPU @ 2.0GHz"  # the first model name
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "weird64")
    info.write_text("processor\t: 0\n")
    assert iad_mix.cpu_name(info) == "weird64"  # no model name: the platform's
    monkeypatch.setattr(platform, "machine", lambda: "")
    assert iad_mix.cpu_name(tmp_path / "missing") == "unknown CPU"
    monkeypatch.undo()
    assert iad_mix.cpu_name() in iad_mix.device_name(torch.device("cpu"))
    monkeypatch.setenv("ONENIP_DATA", str(tmp_path))
    assert iad_mix.iad_mix_root() == tmp_path / "iad-mix"
    ap = argparse.ArgumentParser()
    iad_mix.data_options(ap)
    args = ap.parse_args([])
    assert (args.data, args.textures) == (str(tmp_path / "iad-mix"), str(tmp_path / "textures"))
    monkeypatch.delenv("ONENIP_DATA")
    assert iad_mix.iad_mix_root() == Path(iad_mix.REPO).parent / "shared" / "data" / "iad-mix"


def test_cpu_benchmark_header_versions_and_other_work() -> None:
    """The first lines every CPU benchmark writes (command; commit with src's uncommitted files, CPU, threads,
    versions), the package versions (torch first; a package that does not import is left out), a profile's paragraph,
    and `OtherWork`'s reading where /proc/stat is there (a share of cores, never negative)."""
    cpu = {"model": "Foo CPU", "cores": 2, "flags": ["avx512f", "amx_bf16"]}
    lines = iad_mix.run_lines("python x.py --a", "abc1234", ["src/onenip/m.py"], cpu, 2, {"torch": "2.0", "openvino": "1"},
                              "per runtime")
    assert lines == ["- command: `python x.py --a`",
                     "- commit abc1234 (with uncommitted changes in src/onenip/m.py); CPU: Foo CPU, 2 cores "
                     "(avx512f, amx_bf16); 2 threads per runtime; torch 2.0, openvino 1"]
    assert "uncommitted" not in iad_mix.run_lines("c", "abc1234", [], cpu, 1, {}, "")[1]
    versions = iad_mix.package_versions("numpy", "no_such_package_here")
    assert list(versions) == ["torch", "numpy"] and versions["torch"] == torch.__version__
    prof = {"total_ms": 12.34, "amx_share": 0.5, "parts": {"decoder": 5.0}, "top": [["A (x)", 3.0], ["B (y)", 2.0]]}
    assert iad_mix.profile_line("ov", prof, 1) == ("ov, batch 1, OpenVINO PERF_COUNT (12.3 ms in all, 50 % in AMX "
                                                   "kernels); by part (approximate): decoder 5.00; by layer type: A (x) 3.00")
    with iad_mix.OtherWork() as phase:
        sum(i * i for i in range(200_000))  # this process's own work is not counted
    if iad_mix.OtherWork.busy() is not None:
        assert phase.cores is not None and 0.0 <= phase.cores
    phases = iad_mix.Phases()
    assert phases.run("batch 1", lambda: {"a": 0.002}, lambda v: f"{v * 1000:.1f} ms") == {"a": 0.002}
    assert list(phases.cores) == ["batch 1"]
    phases.cores = {"batch 1": 0.014, "batch 8": None}
    assert phases.text() == "batch 1 0.01, batch 8 ?"


def test_cpu_speed_sorts_turned_decisions_by_why() -> None:
    """benchmarks/cpu_speed.py's parity: a decision that differs from the reference's is counted as made unknown,
    made known, near the threshold (the reference's score within 5 % of it, read back from the normalised score) or
    other; identical decisions are not counted."""
    import numpy as np

    cpu_speed = pytest.importorskip("cpu_speed")
    from onenip.models.scoring import normalize_score

    score = np.array([1.0, 1.04, 2.0, 0.5, 1.0, 0.97, 1.07])
    ref = {"score": score, "normalized": normalize_score(score, 1.0), "anomalous": score > 1.0,
           "known": np.array([1, 1, 1, 1, 0, 1, 1], bool)}
    out = {"score": score, "anomalous": np.array([0, 0, 0, 0, 1, 1, 0], bool),
           "known": np.array([1, 1, 1, 0, 1, 1, 1], bool)}
    # image 0: same; 1: defective -> good at 1.04 x the threshold; 2: defective -> good at 2 x; 3: made unknown;
    # 4: made known; 5: good -> defective at 0.97 x; 6: defective -> good at 1.07 x (7 % away: not near, though its
    # normalised score is within 0.025 of 0.5)
    mine, theirs = cpu_speed.decisions(out), cpu_speed.decisions(ref)
    assert cpu_speed.turned(mine, theirs, ref["normalized"]) == {"to_unknown": 1, "to_known": 1, "near_threshold": 2,
                                                                 "other": 2}
    assert cpu_speed.turned(theirs, theirs, ref["normalized"]) == {"to_unknown": 0, "to_known": 0,
                                                                   "near_threshold": 0, "other": 0}


def test_cpu_speed_times_runtimes_kept_busy_in_blocks_and_after_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/cpu_speed.py's timing on a fake clock: the runtimes take turns in blocks of BLOCK calls, the first
    SKIP of each block (slowed by the switch) are not counted, exactly `repeats` calls are; `idle_latency` rests
    IDLE_GAP before each call it times."""
    import numpy as np

    cpu_speed = pytest.importorskip("cpu_speed")
    clock = [0.0]
    calls: list[str] = []
    sleeps: list[float] = []

    streak = {"last": None, "calls": 0}  # calls in a row of the same runtime

    def runtime(name: str, busy: float):
        def run(batch: np.ndarray) -> dict:
            streak["calls"] = streak["calls"] + 1 if streak["last"] == name else 1
            streak["last"] = name
            calls.append(name)
            clock[0] += busy * (10 if streak["calls"] <= cpu_speed.SKIP else 1)  # slow after a switch
            return {}
        return run

    monkeypatch.setattr(cpu_speed.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(cpu_speed.time, "sleep", lambda s: sleeps.append(s))
    runs = {"a": runtime("a", 1.0), "b": runtime("b", 2.0)}
    medians = cpu_speed.timed_turns(runs, np.zeros(1), repeats=5, warmup=0)
    assert medians == {"a": 1.0, "b": 2.0}  # no slow (switch) call counted
    blocks = -(-5 // (cpu_speed.BLOCK - cpu_speed.SKIP))
    assert calls == (["a"] * cpu_speed.BLOCK + ["b"] * cpu_speed.BLOCK) * blocks
    calls.clear()
    idle = cpu_speed.idle_latency(runs, np.zeros(1), calls=3)
    assert calls == ["a", "b"] * 3 and sleeps == [cpu_speed.IDLE_GAP] * 6
    assert idle == {"a": 10.0, "b": 20.0}  # every timed call follows a switch here: the fake clock's slow calls


def test_the_line_network_is_spelled_alike_everywhere() -> None:
    """configs/line-network.yaml, benchmarks/line_network.py's enc2-dec2-d128-ref64 preset and the GPU plan's `line`
    group (benchmarks/gpu_session.sh) name the same network."""
    import re

    from onenip.config import load_config

    line_network = pytest.importorskip("line_network")
    repo = Path(iad_mix.REPO)
    preset = dict(o.split("=", 1) for o in line_network.PRESETS["enc2-dec2-d128-ref64"])
    plan = re.search(r'^LINE="([^"]*)"', (repo / "benchmarks" / "gpu_session.sh").read_text(), re.M)
    assert plan is not None
    assert dict(o.split("=", 1) for o in plan.group(1).replace("--set ", "").split()) == preset
    model = load_config([repo / "configs" / "line-network.yaml"]).model
    assert {k: str(getattr(model, k.removeprefix("model."))) for k in preset} == preset


def test_result_files_name_the_data_folder_not_the_machines_path(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """`iad_mix.portable`: the data folder (ONENIP_DATA, as given or resolved) is written `$ONENIP_DATA` in a result's
    text; other paths stay."""
    import json

    monkeypatch.setenv("ONENIP_DATA", str(tmp_path / "x" / ".." / "data"))
    text = json.dumps({"roots": [str(tmp_path / "x" / ".." / "data" / "iad-mix")],
                       "textures": str((tmp_path / "data").resolve() / "textures"), "model": "/tmp/m.safetensors"})
    assert json.loads(iad_mix.portable(text)) == {"roots": ["$ONENIP_DATA/iad-mix"], "textures": "$ONENIP_DATA/textures",
                                                   "model": "/tmp/m.safetensors"}


def result_file(folder: Path, name: str, betas: list[float], seeds: list[int]) -> Path:
    """A prompt_fusion.py result file with one model entry per seed."""
    path = folder / f"{name}.json"
    models = [{"model": f"runs/{name}-{s}", "train_seed": s,
               "betas": {str(b): {"mean": {m: 0.5 + 0.01 * s + b for m in prompt_fusion.METRICS}} for b in betas}}
              for s in seeds]
    path.write_text(json.dumps({"command": f"python benchmarks/prompt_fusion.py --output {name}.json",
                                "commit": f"c-{name}", "device": "cpu", "torch": "t", "threads": 2, "betas": betas,
                                "models": models}))
    return path


def test_combine_keeps_every_model_and_where_it_came_from(tmp_path: Path) -> None:
    betas = [0.0, 0.25]
    a = result_file(tmp_path, "a", betas, [133])
    b = result_file(tmp_path, "b", betas, [134, 135])
    models, sources = prompt_fusion.combine([str(a), str(b)], betas)
    assert [m["train_seed"] for m in models] == [133, 134, 135]
    assert [(s["file"], s["commit"]) for s in sources] == [(str(a), "c-a"), (str(b), "c-b")]
    summary = prompt_fusion.summarise(models, betas)
    assert summary["0.0"]["image_auroc"]["mean"] == pytest.approx(0.5 + 0.01 * 134)  # the mean of the three seeds
    assert summary["0.25"]["image_auroc"]["diff_mean"] == pytest.approx(0.25)


def test_combine_refuses_a_file_of_other_betas(tmp_path: Path) -> None:
    a = result_file(tmp_path, "a", [0.0, 0.25], [133])
    b = result_file(tmp_path, "b", [0.0, 0.5], [134])
    with pytest.raises(SystemExit, match="b.json: betas"):
        prompt_fusion.combine([str(a), str(b)], [0.0, 0.25])


def test_trained_model_must_not_know_the_type_left_out(tiny_model: Path) -> None:
    types = ["disc", "weave", "held"]  # the tiny model knows disc and weave
    det = unknown_types.trained_model(tiny_model, "held", types, 64)
    assert det.deployment.categories == ["disc", "weave"]
    with pytest.raises(SystemExit, match="leaving out disc"):
        unknown_types.trained_model(tiny_model, "disc", types, 64)  # it was trained on disc
    with pytest.raises(SystemExit, match="leaving out held"):
        unknown_types.trained_model(tiny_model, "held", [*types, "other"], 64)  # it lacks another type
    with pytest.raises(SystemExit, match="not --input-size 224"):
        unknown_types.trained_model(tiny_model, "held", types, 224)
