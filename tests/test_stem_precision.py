"""The bf16 OpenVINO export keeps its stem in float32 (`onenip.deploy.stem_precision`): which layers the rule picks
in an IR's graph, the mark as OpenVINO's IR reader reads it, and (on a CPU with bf16) that OpenVINO runs the marked
convolutions in float32 and the rest in bf16."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import onenip.deploy.export as export
from onenip.deploy.export import export_model
from onenip.deploy.stem_precision import KEEP_FP32, colour_layers, mark_float32, marked_layers, stem_layers
from onenip.errors import ExportError

has_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                  reason="openvino not installed (pip install 'onenip[openvino]')")


def _layer(id_: int, kind: str, out: tuple[int, ...] | None = None, rt_info: bool = False) -> str:
    dims = "".join(f"<dim>{d}</dim>" for d in out) if out else ""
    info = '<rt_info><attribute name="fused_names" version="0" value="x" /></rt_info>' if rt_info else ""
    port = f'<output><port id="1" precision="FP32">{dims}</port></output>' if out else ""
    return f'<layer id="{id_}" name="l{id_}" type="{kind}" version="opset1">{info}{port}</layer>'


def _graph(tmp_path: Path, layers: list[str], edges: list[tuple[int, int]]) -> Path:
    """A small IR-shaped XML file (no weights: the rule reads the graph only)."""
    text = ('<?xml version="1.0"?><net name="m" version="11"><layers>' + "".join(layers) + "</layers><edges>"
            + "".join(f'<edge from-layer="{a}" from-port="1" to-layer="{b}" to-port="0" />' for a, b in edges)
            + "</edges><rt_info /></net>")
    path = tmp_path / "m.xml"
    path.write_text(text)
    return path


def _backbone_like(tmp_path: Path) -> Path:
    """image -> convert -> normalise -> conv 8 x 32x32 -> clamp -> depthwise 8 x 32x32 -> squeeze-and-excitation
    (pool -> conv 4 x 1x1 -> conv 8 x 1x1 -> multiply) -> conv 8 x 32x32 -> conv 24 x 32x32 (wider) ->
    conv 8 x 32x32 (behind the wider one) -> conv 16x16 -> conv back at 32x32 (a decoder's, behind the downsampled one)
    -> result; and a branch of constants that feeds no convolution."""
    n = (-1, 8, 32, 32)
    layers = [_layer(0, "Parameter", (-1, 3, 64, 64)), _layer(1, "Convert", (-1, 3, 64, 64)),
              _layer(2, "Const", (3,)), _layer(3, "Subtract", (-1, 3, 64, 64)),
              _layer(4, "Convolution", n, rt_info=True), _layer(5, "Const", (8, 3, 3, 3)), _layer(6, "Clamp", n),
              _layer(7, "GroupConvolution", n), _layer(15, "ReduceMean", (-1, 8, 1, 1)),
              _layer(16, "Convolution", (-1, 4, 1, 1)), _layer(17, "Convolution", (-1, 8, 1, 1)),
              _layer(18, "Multiply", n), _layer(19, "Convolution", n), _layer(13, "Convolution", (-1, 24, 32, 32)),
              _layer(14, "Convolution", n), _layer(8, "Convolution", (-1, 8, 16, 16)),
              _layer(9, "Convolution", n), _layer(10, "Result"), _layer(11, "Const", (4, 4)),
              _layer(12, "MatMul", (4, 4))]
    edges = [(0, 1), (1, 3), (2, 3), (3, 4), (5, 4), (4, 6), (6, 7), (7, 15), (15, 16), (16, 17), (7, 18), (17, 18),
             (18, 19), (19, 13), (13, 14), (14, 8), (8, 9), (9, 10), (11, 12)]
    return _graph(tmp_path, layers, edges)


def test_the_stem_is_the_narrow_convolutions_at_the_first_resolution_and_what_feeds_them(tmp_path: Path) -> None:
    path = _backbone_like(tmp_path)
    # not the squeeze-and-excitation branch (15-18) nor what comes after it
    assert stem_layers(ET.parse(path).getroot()) == {"0", "1", "2", "3", "4", "5", "6", "7"}
    assert mark_float32(path) == 5  # the computing layers: not the parameter and the constants
    assert marked_layers(path) == ["l1", "l3", "l4", "l6", "l7"]
    conv = ET.parse(path).getroot().find("layers/layer[@id='4']")
    assert [a.attrib for a in conv.iterfind("rt_info/attribute")] == [
        {"name": "fused_names", "version": "0", "value": "x"}, KEEP_FP32]  # added beside what was there
    children = [child.tag for child in ET.parse(path).getroot().find("layers/layer[@id='6']")]
    assert children == ["rt_info", "output"]  # before the ports, where OpenVINO writes it
    assert mark_float32(path) == 5  # a second call adds nothing
    assert len(ET.parse(path).getroot().find("layers/layer[@id='4']").findall("rt_info/attribute")) == 2


def test_a_graph_without_a_convolution_stem_is_left_as_it_is(tmp_path: Path) -> None:
    path = _graph(tmp_path, [_layer(0, "Parameter", (-1, 4)), _layer(1, "MatMul", (-1, 4)), _layer(2, "Result")],
                  [(0, 1), (1, 2)])
    before = path.read_bytes()
    assert mark_float32(path) == 0 and path.read_bytes() == before
    dynamic = _graph(tmp_path, [_layer(0, "Parameter", (-1, 3, -1, -1)), _layer(1, "Convolution", (-1, 8, -1, -1))],
                     [(0, 1)])
    assert stem_layers(ET.parse(dynamic).getroot()) == set()  # no static resolution to compare
    decoder = _graph(tmp_path, [_layer(0, "Parameter", (-1, 3, 8, 8)), _layer(1, "Convolution", (-1, 8, 4, 4)),
                                _layer(2, "Convolution", (-1, 8, 8, 8))], [(0, 1), (1, 2)])
    assert stem_layers(ET.parse(decoder).getroot()) == {"0", "1"}  # not the decoder's, at a higher resolution


def test_a_file_that_is_not_an_ir_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "model.xml"
    bad.write_text("<net><layers>")  # truncated
    with pytest.raises(ExportError, match=r"model\.xml: cannot read the OpenVINO model's XML"):
        mark_float32(bad)
    with pytest.raises(ExportError, match="cannot read"):
        mark_float32(tmp_path / "missing.xml")


def _amx_bf16() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@has_openvino
def test_a_bf16_export_that_fails_its_check_leaves_the_earlier_files(tiny_model: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The marked file is checked as read back from the temporary folder; when that fails, nothing is moved into
    place: an earlier export keeps its bytes and no temporary folder is left."""
    out = export_model(tiny_model, "openvino", tmp_path / "bf16.xml", precision="bf16")
    for path in (out, out.with_suffix(".bin")):  # an earlier export's files, told apart from what this one writes
        path.write_bytes(path.read_bytes() + b"\n<!-- earlier -->")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    seen = []

    def fail(ov_model, precision, reference):  # the model read back: marked, from the temporary folder
        seen.append(any(f"{KEEP_FP32['name']}_{KEEP_FP32['version']}" in op.get_rt_info() for op in ov_model.get_ops()))
        raise ExportError("the check failed")

    monkeypatch.setattr(export, "_check_low_precision", fail)
    with pytest.raises(ExportError, match="the check failed"):
        export_model(tiny_model, "openvino", out, precision="bf16")
    assert seen == [True]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@has_openvino
def test_the_bf16_export_runs_its_stem_in_float32(tiny_model: Path, tmp_path: Path) -> None:
    """The marks are in the bf16 file only, on the stem; OpenVINO reads them and (on a CPU that runs bf16) executes
    the marked convolutions in float32 and at least the network's in bf16."""
    import openvino as ov

    from onenip.deploy.runtimes import openvino_config

    bf16 = export_model(tiny_model, "openvino", tmp_path / "bf16.xml", precision="bf16")
    fp32 = export_model(tiny_model, "openvino", tmp_path / "fp32.xml")
    assert marked_layers(fp32) == []
    marked = set(marked_layers(bf16))
    root = ET.parse(bf16).getroot()
    convs = {layer.get("name") for layer in root.iterfind("layers/layer") if "Convolution" in layer.get("type", "")}
    assert marked & convs and convs - marked  # some convolutions kept, most not
    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") or not _amx_bf16():
        pytest.skip("no AMX-BF16 on this CPU: the kernels checked here are OpenVINO's for AMX (elsewhere bf16 runs "
                    "other kernels, or in float32)")
    compiled = core.compile_model(core.read_model(str(bf16)), "CPU", {**openvino_config("bf16", 1), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer({0: np.zeros((1, 3, 64, 64), dtype=np.uint8)})
    ran = {p.node_name: p.exec_type for p in request.profiling_info if "Convolution" in p.node_type}
    kept = {name for name, kernel in ran.items() if kernel.lower().endswith("f32")}
    assert kept and kept <= marked, ran  # float32 where marked, and only there
    assert any(kernel.lower().endswith("bf16") for name, kernel in ran.items() if name not in marked), ran


@has_openvino
def test_a_backbone_with_squeeze_and_excitation_exports_at_bf16(gen_data: Path, tmp_path: Path) -> None:
    """efficientnet_b4 (the paper's backbone; random weights here) has squeeze-and-excitation blocks from its first
    block on: the stem stops before them (marked, OpenVINO failed to run the file) and the export, checked as read
    back, runs."""
    from onenip.api import make_config
    from onenip.demo.run import tiny_config
    from onenip.training.trainer import Trainer

    over = [o for o in tiny_config() if not o.startswith(("backbone.", "train.max_steps"))]
    cfg = make_config(None, [*over, f"data.roots=[{gen_data}]", "backbone.name=efficientnet_b4", "backbone.weights=random",
                             "train.max_steps=1", f"output_dir={tmp_path / 'run'}"])
    Trainer(cfg, progress=False).run()
    out = export_model(tmp_path / "run" / "model.safetensors", "openvino", tmp_path / "bf16.xml", precision="bf16")
    root = ET.parse(out).getroot()
    marked = set(marked_layers(out))
    convolutions = {layer.get("id"): layer.get("type") for layer in root.iterfind("layers/layer")
                    if layer.get("name") in marked and "Convolution" in layer.get("type", "")}
    stem, colour = stem_layers(root), colour_layers(root)
    assert sorted(t for i, t in convolutions.items() if i in stem) == ["Convolution", "GroupConvolution"]  # not the SE's
    assert [t for i, t in convolutions.items() if i in colour] == ["Convolution"]  # the colour check's cells
    assert set(convolutions) <= stem | colour



@has_openvino
def test_the_bf16_export_keeps_the_colour_check_in_float32(tiny_model: Path, gen_batch: np.ndarray,
                                                           tmp_path: Path) -> None:
    """The colour check's branch is marked (its convolution, matrix products and median), and on a CPU that runs bf16
    its distances are float32's: rounded to bf16, they moved by 1-2 % (median) and up to 2x on iad-mix."""
    import torch

    from onenip.deploy.runtimes import OpenVinoRuntime
    from onenip.models.detector import Detector
    from onenip.models.inference import DeployModel

    bf16 = export_model(tiny_model, "openvino", tmp_path / "bf16.xml", precision="bf16")
    root = ET.parse(bf16).getroot()
    colour = colour_layers(root)
    types = {layer.get("type") for layer in root.iterfind("layers/layer") if layer.get("id") in colour}
    assert {"Convolution", "TopK", "MatMul"} <= types and not colour & stem_layers(root)
    marked = set(marked_layers(bf16))
    assert all(layer.get("name") in marked for layer in root.iterfind("layers/layer")
               if layer.get("id") in colour and layer.get("type") not in ("Const", "Parameter"))
    if not _amx_bf16():
        pytest.skip("no AMX-BF16 on this CPU: OpenVINO may run the model in float32 there, proving nothing")
    det = Detector.load(tiny_model)
    with torch.no_grad():
        want = DeployModel(det, det.deployment)(torch.from_numpy(gen_batch))["colour_distance"].numpy()
    got = OpenVinoRuntime(bf16, precision="bf16").run(gen_batch)["colour_distance"]
    assert want.max() > 0 and np.allclose(got, want, rtol=1e-4, atol=1e-5), (got, want)
