"""Exported files run by their runtimes (ONNX Runtime, OpenVINO at fp32 / bf16 / int8, TorchScript) through one
interface: the same outputs as PyTorch's `DeployModel` (fp32 within float tolerance; bf16 and int8 the same decisions),
the metadata carried in the file, `Predictor.load` and `onenip predict` on an exported file, and named errors for a
missing optional package or missing calibration data."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_outputs, thresholds_in_widest_gaps, torch_outputs

import onenip
from onenip.cli import main
from onenip.demo.run import TINY_TYPES
from onenip.deploy.export import export_model
from onenip.deploy.predictor import Predictor
from onenip.deploy.runtimes import OUTPUT_NAMES, OpenVinoRuntime, decode_meta, encode_meta, open_runtime
from onenip.errors import CheckpointError, ConfigError, DatasetError, MissingDependencyError
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel

TWO = list(TINY_TYPES)  # the tiny model's types

has_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                  reason="openvino not installed (pip install 'onenip[openvino]')")
has_nncf = pytest.mark.skipif(__import__("importlib").util.find_spec("nncf") is None,
                              reason="nncf not installed (pip install 'onenip[openvino]')")


@pytest.fixture(scope="module")
def deployed(tiny_model: Path, gen_batch: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with mixed, robust decisions on `gen_batch` (bf16 / int8 agreement is then a real test)."""
    return thresholds_in_widest_gaps(tiny_model, gen_batch, tmp_path_factory.mktemp("runtimes") / "model.safetensors")


@pytest.fixture(scope="module")
def reference(deployed: Path, gen_batch: np.ndarray) -> dict[str, np.ndarray]:
    det = Detector.load(deployed)
    return torch_outputs(DeployModel(det, det.deployment).eval(), gen_batch)


@pytest.fixture(scope="module")
def exported(deployed: Path) -> dict[str, Path]:
    """Every export available here, beside the checkpoint."""
    files = {"onnx": export_model(deployed, "onnx"), "torchscript": export_model(deployed, "torchscript")}
    if __import__("importlib").util.find_spec("openvino") is not None:
        folder = deployed.parent
        files["openvino-fp32"] = export_model(deployed, "openvino", folder / "fp32.xml")
        files["openvino-bf16"] = export_model(deployed, "openvino", folder / "bf16.xml", precision="bf16")
        if __import__("importlib").util.find_spec("nncf") is not None:
            files["openvino-int8"] = export_model(deployed, "openvino", folder / "int8.xml", precision="int8")
    return files


@pytest.mark.parametrize("kind", ["onnx", "torchscript", "openvino-fp32"])
def test_float32_runtimes_compute_what_pytorch_computes(kind: str, exported: dict[str, Path], gen_batch: np.ndarray,
                                                        reference: dict[str, np.ndarray]) -> None:
    if kind not in exported:
        pytest.skip(f"{kind}: its package is not installed")
    runtime = open_runtime(exported[kind], threads=1)
    assert runtime.name == {"onnx": "onnxruntime", "torchscript": "torchscript"}.get(kind, "openvino")
    assert_same_outputs(runtime.run(gen_batch), reference)
    for part in (gen_batch[:1], gen_batch[5:8]):  # any batch size
        got = runtime.run(part)
        assert got["map"].shape == (len(part), 64, 64)
    assert set(reference["anomalous"].tolist()) == {False, True}  # both decisions: agreement is a real test
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 3, 64, 64\) with N >= 1"):
        runtime.run(gen_batch.astype(np.float32))
    with pytest.raises(ValueError, match="N >= 1"):
        runtime.run(gen_batch[:0])


@has_openvino
def test_openvino_streams_split_a_batch_and_give_the_same_outputs(exported: dict[str, Path], gen_batch: np.ndarray,
                                                                   reference: dict[str, np.ndarray]) -> None:
    """THROUGHPUT: the batch is split across OpenVINO's streams (two here) and run at once; the parts come back in
    order, so every output equals PyTorch's as the one-stream runtime's does; a single image runs on one stream.
    (OpenVINO chooses the number of streams: two streams of a thread each for two threads.)"""
    runtime = open_runtime(exported["openvino-fp32"], threads=2, hint="THROUGHPUT")
    assert len(runtime.requests) == 2  # two streams, so the batch of 16 below runs as two parts
    assert_same_outputs(runtime.run(gen_batch), reference)
    assert [r.get_input_tensor().shape[0] for r in runtime.requests] == [8, 8]  # both streams ran a half
    one = runtime.run(gen_batch[3:4])
    assert np.allclose(one["score"], reference["score"][3:4], rtol=1e-4)
    with pytest.raises(ConfigError, match="unknown OpenVINO performance hint 'throughput'"):
        open_runtime(exported["openvino-fp32"], hint="throughput")


@has_openvino
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_openvino_takes_the_same_decisions(precision: str, exported: dict[str, Path],
                                                         gen_batch: np.ndarray, reference: dict[str, np.ndarray]) -> None:
    if f"openvino-{precision}" not in exported:
        pytest.skip("nncf not installed")
    runtime = open_runtime(exported[f"openvino-{precision}"], threads=1)
    assert runtime.precision == precision and runtime.meta["precision"] == precision
    got = runtime.run(gen_batch)
    assert np.array_equal(got["category"], reference["category"])
    assert np.array_equal(got["known"], reference["known"])
    # bf16: the same decisions; int8 on this barely trained model (scores 84-97, thresholds a point from some): one
    # image of 16 may cross (benchmarks/cpu_speed.py measures the agreement of a trained model on iad-mix)
    differ = int((got["anomalous"] != reference["anomalous"]).sum())
    assert differ <= (0 if precision == "bf16" else 1), (got["anomalous"], reference["anomalous"])
    rel = np.abs(got["score"] - reference["score"]) / np.abs(reference["score"])
    assert rel.max() < 0.15, rel  # the scores themselves move by bf16 / int8 rounding, not more
    order = np.argsort(reference["score"])
    assert np.corrcoef(got["score"][order], reference["score"][order])[0, 1] > 0.95


def test_metadata_travels_in_every_file(exported: dict[str, Path], deployed: Path) -> None:
    det = Detector.load(deployed)
    dep = det.deployment
    for kind, path in exported.items():
        runtime = open_runtime(path)
        meta = runtime.meta
        assert runtime.categories == TWO and runtime.size == 64, kind
        assert runtime.thresholds == pytest.approx(dep.thresholds, rel=1e-6), kind
        assert meta["version"] == onenip.__version__ and meta["format"] == "onenip-deploy", kind
        assert meta["outputs"] == list(OUTPUT_NAMES) and meta["input_size"] == 64, kind
        assert meta["precision"] == (kind.split("-")[1] if kind.startswith("openvino") else "fp32"), kind
        assert set(meta["normal_scores"]) == set(TWO), kind  # for Predictor(far=...) on the file
        assert runtime.outputs[: len(OUTPUT_NAMES)] == list(OUTPUT_NAMES), kind
    if "openvino-fp32" in exported:
        assert exported["openvino-fp32"].with_suffix(".bin").is_file()


def test_predictor_load_chooses_the_runtime_by_suffix(exported: dict[str, Path], deployed: Path, gen_data: Path) -> None:
    files = sorted((gen_data / "disc" / "test").rglob("*.png"))[:3] + sorted((gen_data / "weave" / "test").rglob("*.png"))[:3]
    want = Predictor.load(deployed, device="cpu").predict(files)
    for kind, path in exported.items():
        predictor = Predictor.load(path, batch_size=4)
        assert predictor.categories == TWO and predictor.size == 64
        got = predictor.predict(files)
        assert [p.category for p in got] == [p.category for p in want], kind
        if not kind.endswith(("bf16", "int8")):
            assert [p.decision for p in got] == [p.decision for p in want], kind
            for g, w in zip(got, want):
                assert g.anomaly_map.shape == w.anomaly_map.shape
                assert g.score == pytest.approx(w.score, rel=1e-4) and g.threshold == pytest.approx(w.threshold)
                assert g.type_distance == pytest.approx(w.type_distance, rel=1e-4, abs=1e-5)
    # another sensitivity on the file: the decisions made again from its raw scores, as the checkpoint makes them
    for options in ({"level": 0.3}, {"far": 0.0}):
        want = Predictor.load(deployed, device="cpu", **options).predict(files)
        got = Predictor.load(exported["onnx"], **options).predict(files)
        assert [p.decision for p in got] == [p.decision for p in want], options
        assert [p.normalized for p in got] == pytest.approx([p.normalized for p in want], rel=1e-4), options
    with pytest.raises(ConfigError, match="--type needs the model file"):
        Predictor.load(exported["onnx"], product_type="disc")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        Predictor.load(exported["onnx"], device="cuda")


def test_predict_command_on_an_exported_file(exported: dict[str, Path], deployed: Path, gen_data: Path,
                                             tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(gen_data / "disc" / "test", inputs)
    assert main(["predict", str(deployed), str(inputs), "--output", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    want = json.loads((tmp_path / "ckpt" / "predictions.json").read_text())["predictions"]
    kind = "openvino-fp32" if "openvino-fp32" in exported else "onnx"
    assert main(["predict", str(exported[kind]), str(inputs), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    got = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    assert [r["decision"] for r in got] == [r["decision"] for r in want]
    assert [r["category"] for r in got] == [r["category"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-4)
    assert all((tmp_path / "out" / r["overlay"]).is_file() for r in got)


@has_openvino
def test_export_command_writes_openvino(deployed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "line" / "model.xml"
    assert main(["export", str(deployed), "--format", "openvino", "--precision", "bf16", "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.bin", "model.xml"]  # no temporary left
    assert isinstance(open_runtime(out), OpenVinoRuntime) and open_runtime(out).precision == "bf16"


def test_precision_applies_to_openvino_only(deployed: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="openvino format only"):
        export_model(deployed, "onnx", tmp_path / "x.onnx", precision="int8")
    with pytest.raises(ConfigError, match="unknown precision"):
        export_model(deployed, "openvino", tmp_path / "x.xml", precision="fp8")
    assert not list(tmp_path.iterdir())


@has_openvino
@has_nncf
def test_int8_without_the_training_images_names_them(deployed: Path, tmp_path: Path) -> None:
    det = Detector.load(deployed)
    det.cfg.data.roots = [str(tmp_path / "gone" / "gen-mix")]
    moved = det.save(tmp_path / "moved.safetensors")
    with pytest.raises(DatasetError, match=r"training roots \(data.roots\) .*gone/gen-mix are not there.*--precision bf16"):
        export_model(moved, "openvino", tmp_path / "x.xml", precision="int8")
    assert not (tmp_path / "x.xml").exists()


@pytest.mark.parametrize(("module", "fmt", "precision"), [("openvino", "openvino", "fp32"), ("nncf", "openvino", "int8")])
def test_missing_package_names_the_extra(module: str, fmt: str, precision: str, deployed: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    with pytest.raises(MissingDependencyError, match=rf"needs the Python package {module}.*pip install 'onenip\[openvino\]'"):
        export_model(deployed, fmt, tmp_path / "x.xml", precision=precision)
    assert not list(tmp_path.iterdir())


def test_missing_runtime_package_names_the_extra(exported: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    xml = tmp_path / "model.xml"  # the check comes before the file is read: any .xml will do
    xml.write_text("<net/>")
    xml.with_suffix(".bin").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'onenip\[openvino\]'"):
        Predictor.load(xml)
    with pytest.raises(MissingDependencyError, match=r"pip install 'onenip\[onnx\]'"):
        Predictor.load(exported["onnx"])


def test_unusable_files_are_named(tmp_path: Path, exported: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        open_runtime(tmp_path / "missing.onnx")
    with pytest.raises(CheckpointError, match="not an exported model file"):
        open_runtime(tmp_path / "model.tflite")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="onnxruntime cannot load"):
        open_runtime(bad)
    if "openvino-fp32" in exported:
        xml = tmp_path / "alone.xml"
        shutil.copy(exported["openvino-fp32"], xml)  # without its .bin
        with pytest.raises(CheckpointError, match=r"alone.bin are missing"):
            open_runtime(xml)


def test_metadata_round_trips_strings_that_look_like_numbers() -> None:
    """Every value is stored as JSON, so a string of digits stays a string (it came back as an int before), and
    metadata without onenip's keys or a valid input size is refused naming the file."""
    meta = {"categories": ["7", "a"], "input_size": 64, "version": "1", "source": "007", "fusion_scale": None}
    assert all(isinstance(v, str) for v in encode_meta(meta).values())  # what ONNX and OpenVINO store
    assert decode_meta(encode_meta(meta), "x.onnx") == meta
    old = {"categories": '["a"]', "input_size": "64", "version": "0.3.1"}  # written before every value was JSON
    assert decode_meta(old, "x.onnx") == {"categories": ["a"], "input_size": 64, "version": "0.3.1"}
    with pytest.raises(CheckpointError, match="x.onnx is not a model exported by onenip"):
        decode_meta(encode_meta({"categories": ["a"]}), "x.onnx")
    with pytest.raises(CheckpointError, match="x.xml: its onenip metadata has no valid input size"):
        decode_meta(encode_meta({"categories": ["a"], "input_size": "64"}), "x.xml")
