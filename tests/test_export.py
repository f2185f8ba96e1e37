"""Export: ONNX and TorchScript files that compute what `DeployModel` computes, on their own (pool inside, no checkpoint,
no onenip, and for ONNX no torch), written atomically, with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_outputs, thresholds_in_widest_gaps, torch_outputs

from onenip.api import make_config
from onenip.data import read_sources
from onenip.demo.run import TINY_TYPES
from onenip.deploy.export import ExportError, MissingDependencyError, OnnxPredictor, export_model, load_torchscript
from onenip.errors import CheckpointError, ConfigError, OnenipError
from onenip.evaluation.calibration import build_deployment
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel
from onenip.training.trainer import Trainer

TWO = list(TINY_TYPES)  # two generated categories: an object and a texture


def small(*extra: str) -> list[str]:
    return ["data.input_size=64", "data.workers=0", "backbone.name=tf_efficientnet_lite0",
            "backbone.weights=efficientnet-lite", "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4",
            "model.refiner_channels=32", "train.device=cpu", "eval.batch_size=16", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gen_data: Path, gen_textures: Path) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = make_config(None, small(f"data.roots=[{gen_data}]", "data.categories=[disc, weave]",
                                  f"data.textures={gen_textures}", "data.holdout=0.2", "train.batch_size=8",
                                  "train.max_steps=6", "eval.far=0.05", f"output_dir={run}"))
    Trainer(cfg, progress=False).run()
    return run / "model.safetensors"


@pytest.fixture(scope="module")
def deployed(trained: Path, gen_batch: np.ndarray, tmp_path_factory) -> Path:
    """The trained model with mixed, robust decisions on `gen_batch` (six training steps flag nothing): identical
    decisions are then a real test."""
    return thresholds_in_widest_gaps(trained, gen_batch, tmp_path_factory.mktemp("deployed") / "model.safetensors")


@pytest.fixture(scope="module")
def reference(deployed: Path) -> DeployModel:
    det = Detector.load(deployed)
    return DeployModel(det, det.deployment).eval()


@pytest.fixture(scope="module")
def onnx_file(deployed: Path, tmp_path_factory) -> Path:
    """An ONNX export of a copy of the checkpoint, at the default path beside it; the copy is deleted afterwards."""
    folder = tmp_path_factory.mktemp("onnx")
    ckpt = folder / "mymodel.safetensors"
    ckpt.write_bytes(deployed.read_bytes())
    path = export_model(ckpt, "onnx")
    assert path == folder / "mymodel.onnx"
    ckpt.unlink()
    return path


def run_isolated(code: str, tmp_path: Path, block: tuple[str, ...]) -> str:
    """Run `code` in a fresh interpreter in which the modules `block` cannot be imported."""
    script = tmp_path / "isolated.py"
    script.write_text(f"import sys\nsys.modules.update({{m: None for m in {block!r}}})\n" + textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- ONNX ----------------------------------------------------------------------------------------------------------------


def test_onnx_matches_pytorch(onnx_file: Path, reference: DeployModel, gen_batch: np.ndarray) -> None:
    predictor = OnnxPredictor(onnx_file)
    assert predictor.categories == reference.categories == TWO
    assert predictor.size == 64
    assert predictor.thresholds == pytest.approx(dict(zip(TWO, reference.thresholds.tolist())), rel=1e-7)
    diffs = []
    for batch in (gen_batch, gen_batch[:1], gen_batch[3:8]):  # the export traced a batch of 2: N is dynamic
        got = predictor.predict(batch)
        want = torch_outputs(reference, batch)
        diffs.append(assert_same_outputs(got, want))
        assert got["category_names"].tolist() == [TWO[i] for i in want["category"]]
    print(f"ONNX: largest map difference {max(diffs):.3g}")
    full = predictor.predict(gen_batch)
    assert set(full["category"].tolist()) == {0, 1}  # both categories retrieved
    assert set(full["anomalous"].tolist()) == {False, True}  # both decisions
    assert full["map"].max() > 1.0  # not a trivially small map: the 1e-4 bound is a real test
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(gen_batch.astype(np.float32))
    with pytest.raises(ValueError, match="N >= 1"):
        predictor.predict(gen_batch[:0])


def test_onnx_graph_and_metadata(onnx_file: Path, reference: DeployModel) -> None:
    import onnx

    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, 64, 64]
    assert [o.name for o in proto.graph.output] == ["score", "normalized", "anomalous", "category", "similarity", "map",
                                                    "known", "type_distance", "colour_distance"]
    out_map = proto.graph.output[5].type.tensor_type
    assert [d.dim_param or d.dim_value for d in out_map.shape.dim] == ["batch", 64, 64]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["onenip.categories"]) == reference.categories
    assert int(props["onenip.input_size"]) == 64
    assert json.loads(props["onenip.version"]) == __import__("onenip").__version__  # every value JSON
    assert set(json.loads(props["onenip.thresholds"])) == set(TWO)
    # the prompt pool is inside the file, bit for bit (encoded once: the prompts are fixed)
    pool = reference.pool_encoded.numpy()
    inits = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if tuple(t.dims) == pool.shape]
    assert any(np.array_equal(a, pool) for a in inits)
    assert onnx_file.stat().st_size > pool.nbytes + sum(p.numel() for p in reference.parameters()) * 4 * 0.9


def test_onnx_runs_without_checkpoint_onenip_or_torch(onnx_file: Path, reference: DeployModel, gen_batch: np.ndarray,
                                                      tmp_path: Path) -> None:
    assert not list(onnx_file.parent.glob("*.safetensors"))  # the checkpoint it came from is gone
    np.save(tmp_path / "images.npy", gen_batch)
    out = run_isolated(f"""
        import json
        import numpy as np
        import onnxruntime as ort
        session = ort.InferenceSession({str(onnx_file)!r}, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        result = dict(zip(names, session.run(names, {{"images": np.load("images.npy")}})))
        np.savez("out.npz", **result)
        print(session.get_modelmeta().custom_metadata_map["onenip.categories"])
    """, tmp_path, block=("torch", "onenip", "timm"))
    assert json.loads(out) == reference.categories
    got = dict(np.load(tmp_path / "out.npz"))
    assert_same_outputs(got, torch_outputs(reference, gen_batch))


def test_onnx_export_of_a_prompt_free_model_without_refiner(gen_data: Path, tmp_path: Path, gen_batch: np.ndarray) -> None:
    """UniAD (no prompt, the pool only picks the threshold) without refiner: the other branches of DeployModel."""
    cfg = make_config(None, small(f"data.roots=[{gen_data}]", "data.categories=[disc, weave]",
                                  "model.arch=uniad", "train.prompt=none", "model.refiner=false", "eval.prompt_pool=2"))
    torch.manual_seed(0)
    det = Detector.build(cfg).eval()
    train = read_sources(cfg.data.roots, "train", TWO)
    det.deployment = build_deployment(det, train[::10], train[1::10], far=0.1, cfg=cfg)
    ckpt = det.save(tmp_path / "uniad.safetensors")
    (tmp_path / "out").mkdir()
    path = export_model(ckpt, "onnx", tmp_path / "out")  # an existing folder: the default name inside it
    assert path == tmp_path / "out" / "uniad.onnx"
    model = DeployModel(det, det.deployment).eval()
    assert_same_outputs(OnnxPredictor(path).predict(gen_batch), torch_outputs(model, gen_batch))


# -- TorchScript ---------------------------------------------------------------------------------------------------------


def test_torchscript_matches_pytorch_without_onenip(deployed: Path, reference: DeployModel, gen_batch: np.ndarray,
                                                    tmp_path: Path, monkeypatch) -> None:
    for name in ("onnx", "onnxruntime"):  # TorchScript export needs neither
        monkeypatch.setitem(sys.modules, name, None)
    path = export_model(deployed, "torchscript", tmp_path / "model.torchscript.pt")
    module, meta = load_torchscript(path)
    assert meta["categories"] == reference.categories and meta["input_size"] == 64
    assert not any(p.requires_grad for p in module.parameters())  # a call builds no autograd graph
    assert module(torch.from_numpy(gen_batch))["score"].grad_fn is None
    np.save(tmp_path / "images.npy", gen_batch)
    out = run_isolated("""
        import json, warnings
        import numpy as np
        import torch
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch >= 2.9 (still works)
        extra = {"onenip.json": ""}
        module = torch.jit.load("model.torchscript.pt", map_location="cpu", _extra_files=extra)
        images = torch.from_numpy(np.load("images.npy"))
        with torch.no_grad():
            for name, batch in (("all", images), ("part", images[2:7])):
                np.savez(f"{name}.npz", **{k: v.numpy() for k, v in module(batch).items()})
        print(json.loads(extra["onenip.json"])["categories"])
    """, tmp_path, block=("onenip", "timm"))
    assert out.strip() == str(reference.categories)
    diffs = [assert_same_outputs(dict(np.load(tmp_path / "all.npz")), torch_outputs(reference, gen_batch)),
             assert_same_outputs(dict(np.load(tmp_path / "part.npz")), torch_outputs(reference, gen_batch[2:7]))]
    print(f"TorchScript: largest map difference {max(diffs):.3g}")
    with torch.no_grad():
        assert_same_outputs({k: v.numpy() for k, v in module(torch.from_numpy(gen_batch[:1])).items()},
                            torch_outputs(reference, gen_batch[:1]))
        # the trace kept the uint8 path: anything else is refused, not read as 0-255 (or resized, or empty)
        with pytest.raises(Exception, match=r"got another dtype \(float images in \[0, 1\]\?") as info:
            module(torch.from_numpy(gen_batch).float() / 255)
        assert "got 6" not in str(info.value)  # TorchScript prints a dtype as its number: not in the message
        for bad in (torch.from_numpy(gen_batch[:, :, :32]), torch.from_numpy(gen_batch[:0])):
            with pytest.raises(Exception, match=r"expected uint8 images of shape \(N, 3, 64, 64\) with N >= 1"):
                module(bad)


# -- errors and atomic writing -------------------------------------------------------------------------------------------


def test_unknown_format_and_opset(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="onnx, torchscript"):
        export_model(trained, "tflite", tmp_path / "x")
    with pytest.raises(ConfigError, match="opset"):
        export_model(trained, "onnx", tmp_path / "x.onnx", opset=9)
    with pytest.raises(ConfigError, match="opsets are ONNX's only"):  # not silently ignored
        export_model(trained, "torchscript", tmp_path / "x.pt", opset=17)
    assert not list(tmp_path.iterdir())


def test_checkpoint_without_deployment(trained: Path, tmp_path: Path) -> None:
    det = Detector.load(trained)
    det.deployment = None
    bare = det.save(tmp_path / "bare.safetensors")
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(CheckpointError, match="no prompt pool.*onenip calibrate"):
            export_model(bare, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.safetensors"]


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_onnx_packages_give_the_install_hint(trained: Path, onnx_file: Path, tmp_path: Path, monkeypatch,
                                                     missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'onenip\[onnx\]'") as info:
        export_model(trained, "onnx", tmp_path / "x.onnx")
    assert isinstance(info.value, OnenipError) and missing in str(info.value)
    assert not (tmp_path / "x.onnx").exists()
    if missing == "onnxruntime":
        with pytest.raises(MissingDependencyError, match=r"pip install 'onenip\[onnx\]'"):
            OnnxPredictor(onnx_file)


def test_failed_export_leaves_no_file(trained: Path, tmp_path: Path, monkeypatch) -> None:
    import onenip.deploy.export as export

    def broken_onnx(module, example, path, opset):  # writes half a file where it was told to, then fails
        Path(path).write_bytes(b"half a model")
        raise RuntimeError("exporter exploded")

    def broken_save(module, f, **kwargs):
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(b"half a model")
        else:
            f.write(b"half a model")
        raise RuntimeError("exporter exploded")

    out = tmp_path / "model.onnx"
    monkeypatch.setattr(export, "_torch_onnx_export", broken_onnx)
    with pytest.raises(ExportError, match="exporter exploded"):
        export_model(trained, "onnx", out)
    assert not list(tmp_path.iterdir())
    out.write_bytes(b"previous export")  # an earlier file stays as it was
    with pytest.raises(ExportError):
        export_model(trained, "onnx", out)
    assert out.read_bytes() == b"previous export" and len(list(tmp_path.iterdir())) == 1

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(ExportError, match="exporter exploded"):
        export_model(trained, "torchscript", tmp_path / "model.torchscript.pt")
    assert len(list(tmp_path.iterdir())) == 1


def test_export_that_computes_something_else_is_refused(trained: Path, tmp_path: Path, monkeypatch) -> None:
    """The check run before writing: an export whose maps differ from PyTorch's (here: off by 0.01 somewhere) is not written."""
    import onenip.deploy.export as export

    real = export._TupleOutputs.forward

    def shifted(self, images):
        out = list(real(self, images))
        out[-1] = out[-1] + 0.01
        return tuple(out)

    monkeypatch.setattr(export._TupleOutputs, "forward", shifted)
    with pytest.raises(ExportError, match="does not compute what PyTorch computes"):
        export_model(trained, "onnx", tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_export_command(trained: Path, tmp_path: Path, capsys) -> None:
    from onenip import cli

    out = tmp_path / "m.pt"
    assert cli.main(["export", str(trained), "--format", "torchscript", "--output", str(out)]) == 0
    assert out.is_file() and f"exported: {out}" in capsys.readouterr().out
    assert cli.main(["export", str(trained), "--opset", "3", "--output", str(tmp_path / "x.onnx")]) == 2
    assert "opset" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    assert cli.main(["export", str(trained), "--format", "torchscript", "--opset", "17",
                     "--output", str(tmp_path / "y.pt")]) == 2
    assert "opsets are ONNX's only" in capsys.readouterr().err and not (tmp_path / "y.pt").exists()
