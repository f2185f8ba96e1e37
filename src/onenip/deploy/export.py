"""Exporting a trained model as one self-contained file: ONNX (for onnxruntime and other ONNX runtimes), TorchScript,
or OpenVINO IR (fp32, bf16 or int8).

The exported graph is the whole `DeployModel`: uint8 images (N, 3, S, S) in RGB -> backbone features -> retrieval of
the most similar prompt of the pool -> reconstruction -> fused anomaly map -> score and decision. The prompt pool, the
per-category thresholds and the fusion constant are constants inside the file: neither onenip, its training data nor
the checkpoint is needed to run it. N is dynamic; S is the model's input size (fixed).

Outputs, in this order (ONNX output names; keys of the TorchScript module's dict):

- ``score`` (N,) float32: the raw score, maximum of the average-pooled anomaly map;
- ``normalized`` (N,) float32: 1 - 2^(-score / threshold), 0.5 at the threshold;
- ``anomalous`` (N,) bool: score > threshold of the retrieved category, and the image of a known type;
- ``category`` (N,) int64: index of the retrieved category, into the ``categories`` list of the metadata;
- ``similarity`` (N,) float32: cosine similarity to the retrieved prompt;
- ``map`` (N, S, S) float32: the fused anomaly map at the input size;
- ``known`` (N,) bool: False for an image of no product type the model knows (it is not judged; the check tries the
  most similar types, `onenip.models.scoring.unknown_scores`);
- ``type_distance`` (N,) float32: how far the image is from the retrieved type's prompt images (the type check's
  measure);
- ``colour_distance`` (N,) float32: how far its colour is from the retrieved type's normal colours (the check's other
  one).

Metadata: ONNX files carry ``metadata_props`` and OpenVINO files ``rt_info`` under ``onenip``, every value JSON
(``onenip.categories`` a list, ``onenip.input_size``, ``onenip.thresholds`` an object category -> raw-score threshold,
``onenip.version`` a string, ...: `onenip.deploy.runtimes.encode_meta`), TorchScript files an extra file
``onenip.json`` with the same keys (without the ``onenip.`` prefix). `onenip.deploy.runtimes.open_runtime` runs any of
them; `load_torchscript` reads a TorchScript file and its metadata.

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): in torch 2.14 it is
deprecated but present, exports this model in about a second and needs no package beyond ``onnx``; the
``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9) gives the same graph here but takes
~20x longer and needs ``onnxscript``. TorchScript (``torch.jit.trace``/``save``/``load``) is likewise deprecated in
torch 2.14 but works; the deprecation warnings are silenced while exporting. Every export is checked before it is
written: the file is loaded back (ONNX: ``onnx.checker`` and an onnxruntime session) and run on a batch of a size
other than the one traced, and its maps must match PyTorch's.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from onenip.checkpoint import atomic_write_bytes, check_output_file
from onenip.deploy.runtimes import (
    INPUT_NAME,
    METADATA_FILE,
    METADATA_PREFIX,
    OPENVINO_PRECISION_HINT,
    OUTPUT_NAMES,
    PRECISIONS,
    OnnxRuntime,
    encode_meta,
    load_torchscript,
    openvino_config,
    require,
)
from onenip.deploy.stem_precision import colour_operations, mark_float32
from onenip.errors import CheckpointError, ConfigError, DatasetError, ExportError, MissingDependencyError, OnenipError
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel

__all__ = ["INPUT_NAME", "METADATA_FILE", "OUTPUT_NAMES", "FORMATS", "PRECISIONS", "ExportError",
           "MissingDependencyError", "OnnxPredictor", "export_model", "load_torchscript", "default_output"]

log = logging.getLogger(__name__)

FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "openvino": ".xml"}
"""Export formats and the suffix of their default file name (OpenVINO: the .xml and its .bin beside it)."""
OPSET_RANGE = (14, 20)
"""ONNX opsets the TorchScript-based exporter handles for this model (scaled_dot_product_attention needs 14)."""
CALIBRATION_IMAGES = 300
"""int8: at most this many of the model's normal training images calibrate the quantization (NNCF's default)."""
TRACE_BATCH, CHECK_BATCH = 2, 3
"""Batch size of the example traced, and of the check run on the written file (a different one: N is dynamic)."""
CHECK_ATOL, CHECK_RTOL = 1e-4, 1e-5
"""Largest |exported - PyTorch| the export check allows: CHECK_ATOL + CHECK_RTOL * (largest |PyTorch map value|)."""


# --------------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------------


def export_metadata(model: DeployModel, source: str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """What a user of the exported file needs besides the graph: category names (index order), input size,
    thresholds (as float32, the values the graph compares against), the outputs, the versions, the precision the
    file is meant to run at (OpenVINO: fp32, bf16 or int8; the others: fp32)."""
    from onenip.version import __version__

    thresholds = model.thresholds.detach().cpu().tolist()
    return {
        "format": "onenip-deploy",
        "format_version": 1,
        "version": __version__,
        "torch": torch.__version__,
        "categories": list(model.categories),
        "input_size": int(model.size),
        "input": f"{INPUT_NAME}: uint8 (N, 3, {model.size}, {model.size}) RGB, resized straight to the input size",
        "outputs": list(OUTPUT_NAMES),
        "thresholds": {c: float(t) for c, t in zip(model.categories, thresholds)},
        "retrieval": "type_mean" if model.by_type else "nearest",
        "fusion_alpha": model.alpha,
        "fusion_scale": model.scale,
        "score_kernel": model.kernel,
        "backbone": getattr(model.extractor, "name", ""),
        "source": source or "",
        "precision": precision,
    }


def _onnx_props(meta: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as ONNX metadata_props: ``onenip.<key>`` -> `encode_meta`'s JSON."""
    return {f"{METADATA_PREFIX}.{k}": v for k, v in encode_meta(meta).items()}


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


class _TupleOutputs(nn.Module):
    """DeployModel with its outputs as a tuple in `OUTPUT_NAMES` order (ONNX outputs are positional)."""

    def __init__(self, model: DeployModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images)
        return tuple(out[name] for name in OUTPUT_NAMES)


def _example_images(batch: int, size: int, seed: int) -> Tensor:
    """Random uint8 images (batch, 3, size, size): an example to trace, or a check input."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silences what tracing this model always says: the deprecation of TorchScript and of the TorchScript-based ONNX
    exporter in torch >= 2.9, and TracerWarnings about the model's shape checks (input rank, batch divisibility, tap
    sizes), which hold for every batch size (the export check runs another batch size to show it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield


def _torch_onnx_export(module: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """The TorchScript-based ONNX exporter, batch axis dynamic (separate so tests can make it fail)."""
    torch.onnx.export(
        module, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
        opset_version=opset, dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        do_constant_folding=True, dynamo=False,
    )


def _check_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, Tensor], what: str) -> float:
    """Raise ExportError unless the exported file's outputs match PyTorch's; returns the largest map difference."""
    allowed = CHECK_ATOL + CHECK_RTOL * float(np.abs(want["map"].numpy()).max())
    diffs = {}
    for name in ("score", "map", "similarity", "type_distance"):
        a, b = np.asarray(got[name], dtype=np.float64), want[name].numpy().astype(np.float64)
        if a.shape != b.shape:
            raise ExportError(f"{what}: output {name} has shape {a.shape}, PyTorch's {b.shape}")
        diffs[name] = float(np.abs(a - b).max()) if a.size else 0.0
    ok = all(math.isfinite(d) and d <= allowed for d in diffs.values())
    if "colour_distance" in want:  # in its own units (a Mahalanobis distance): relative to its own size
        a, b = np.asarray(got["colour_distance"], dtype=np.float64), want["colour_distance"].numpy().astype(np.float64)
        colour_allowed = CHECK_ATOL + CHECK_RTOL * float(np.abs(b).max(initial=0.0))
        diffs["colour_distance"] = float(np.abs(a - b).max()) if a.shape == b.shape and a.size else 0.0
        ok = ok and a.shape == b.shape and math.isfinite(diffs["colour_distance"]) and diffs["colour_distance"] <= colour_allowed
    if not ok:
        raise ExportError(f"{what} does not compute what PyTorch computes: largest differences {diffs} "
                          f"(allowed {allowed:.3g}, colour distance relative to its size)")
    return diffs["map"]


def _export_onnx(model: DeployModel, meta: dict[str, Any], opset: int) -> tuple[bytes, float]:
    """The model as ONNX bytes, with metadata, validated by onnx.checker and run once by onnxruntime; and the largest
    difference of its maps from PyTorch's."""
    onnx = require("onnx", "exporting to ONNX")
    ort = require("onnxruntime", "checking the ONNX export")
    wrapper = _TupleOutputs(model).eval()
    size = model.size
    with tempfile.TemporaryDirectory(prefix="onenip-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with _quiet_tracing(), torch.no_grad():
                _torch_onnx_export(wrapper, _example_images(TRACE_BATCH, size, seed=0), raw, opset)
            proto = onnx.load(str(raw))
        except OnenipError:
            raise
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}: {exc})") from exc
    # the exporter cannot infer the map's spatial size through Resize; it is the input size
    for out in proto.graph.output:
        if out.name == "map":
            dims = out.type.tensor_type.shape.dim
            for d in (dims[1], dims[2]):
                d.Clear()
                d.dim_value = size
    onnx.helper.set_model_props(proto, _onnx_props(meta))
    proto.doc_string = (f"onenip anomaly detector ({', '.join(model.categories)}): {INPUT_NAME} uint8 (N, 3, {size}, "
                        f"{size}) -> {', '.join(OUTPUT_NAMES)}; category indexes onenip.categories")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX graph is not valid: {exc}") from exc
    data = proto.SerializeToString()
    check = _example_images(CHECK_BATCH, size, seed=1)
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: check.numpy()})))
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot run the exported model on {CHECK_BATCH} images ({exc})") from exc
    with torch.no_grad():
        diff = _check_outputs(got, model(check), "the ONNX export")
    return data, diff


class _CheckedInput(nn.Module):
    """What a traced model cannot do: refuse input other than the uint8 (N, 3, S, S) it was traced with (a trace
    keeps the path of the example's dtype, so float images in [0, 1] would be divided by 255 once more, silently).
    Scripted, around the traced model."""

    def __init__(self, traced: nn.Module, size: int) -> None:
        super().__init__()
        self.model = traced
        self.size = size

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dtype != torch.uint8:  # TorchScript prints a dtype as a number: name the common mistake instead
            raise ValueError(f"expected uint8 images (0-255) of shape (N, 3, {self.size}, {self.size}); got another "
                             "dtype (float images in [0, 1]? multiply by 255 and convert them to uint8)")
        if images.dim() != 4 or images.size(0) < 1 or images.size(1) != 3 or images.size(2) != self.size \
                or images.size(3) != self.size:
            raise ValueError(f"expected uint8 images of shape (N, 3, {self.size}, {self.size}) with N >= 1, got "
                             f"shape {images.shape}")
        return self.model(images)


def _export_torchscript(model: DeployModel, meta: dict[str, Any]) -> tuple[bytes, float]:
    """The model traced with torch.jit.trace inside a scripted input check, saved with its metadata as the extra
    file onenip.json; and the largest difference of its maps from PyTorch's."""
    try:
        with _quiet_tracing(), torch.no_grad():
            traced = torch.jit.trace(model, (_example_images(TRACE_BATCH, model.size, seed=0),), strict=False,
                                     check_trace=False)
            checked = torch.jit.script(_CheckedInput(traced, model.size))
            buf = io.BytesIO()
            torch.jit.save(checked, buf, _extra_files={METADATA_FILE: json.dumps(meta)})
            data = buf.getvalue()
            loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
            check = _example_images(CHECK_BATCH, model.size, seed=1)
            got = {k: v.numpy() for k, v in loaded(check).items()}
            want = model(check)
    except Exception as exc:
        raise ExportError(f"TorchScript export failed ({type(exc).__name__}: {exc})") from exc
    return data, _check_outputs(got, want, "the TorchScript export")


# --------------------------------------------------------------------------------------------------------------------
# OpenVINO
# --------------------------------------------------------------------------------------------------------------------


def calibration_images(detector: Detector, limit: int = CALIBRATION_IMAGES) -> np.ndarray:
    """int8 calibration data: up to `limit` of the model's own normal training images (the train split of its
    ``data.roots``, its trained categories, without the images it held out for the thresholds), taken in turn from
    each category, resized straight to the input size: uint8 (n, 3, S, S).

    Raises DatasetError naming what is missing: the roots the model records, or images in them."""
    from onenip.data import group_by_category, read_sources
    from onenip.data.images import load_batch

    roots = [str(r) for r in (detector.cfg.data.roots or [])]
    categories = sorted(detector.extra.get("categories") or [])
    hint = ("int8 quantization calibrates on the model's own normal training images; export with --precision bf16 "
            "or fp32 (no data needed), or export on a machine where they are")
    if not roots:
        raise DatasetError(f"the model records no training roots (data.roots): {hint}")
    missing = [r for r in roots if not Path(r).exists()]
    if missing:
        raise DatasetError(f"the model's training roots (data.roots) {', '.join(missing)} are not there (from "
                           f"{Path.cwd()}): {hint}")
    held = {str(p) for p in detector.extra.get("holdout", [])}
    samples = [s for s in read_sources(roots, "train", categories or None) if s.label == 0 and str(s.image) not in held]
    if not samples:
        raise DatasetError(f"no normal training images of {', '.join(categories) or 'any category'} in "
                           f"{', '.join(roots)}: {hint}")
    in_turn = itertools.zip_longest(*group_by_category(samples).values())  # one of each category in turn
    chosen = [s for row in in_turn for s in row if s is not None][:limit]  # the small categories are all in
    size = detector.input_size
    return np.ascontiguousarray(load_batch([s.image for s in chosen], size))


def _openvino_model(model: DeployModel) -> Any:
    """The DeployModel as an OpenVINO model, converted from PyTorch by OpenVINO's PyTorch frontend (which traces it as
    the TorchScript export does, and keeps scaled_dot_product_attention as one fused ScaledDotProductAttention op; the
    ONNX graph spells attention out as MatMul, Where, Softmax and IsNaN nodes, ~20 % slower here): input ``images`` u8
    (N, 3, S, S) with N dynamic, outputs named as the ONNX file's."""
    ov = require("openvino", "exporting to OpenVINO")
    size = model.size
    try:
        with _quiet_tracing(), torch.no_grad():
            ov_model = ov.convert_model(_TupleOutputs(model).eval(), example_input=_example_images(TRACE_BATCH, size, seed=0),
                                        input=[(ov.PartialShape([-1, 3, size, size]), ov.Type.u8)])
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot convert the model ({type(exc).__name__}: {exc})") from exc
    if len(ov_model.outputs) != len(OUTPUT_NAMES):
        raise ExportError(f"the OpenVINO model has {len(ov_model.outputs)} outputs, not {len(OUTPUT_NAMES)}")
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for out, name in zip(ov_model.outputs, OUTPUT_NAMES):
        out.get_tensor().set_names({name})
    return ov_model


def _run_openvino(ov_model: Any, precision: str, images: Tensor) -> dict[str, np.ndarray]:
    ov = require("openvino", "running an OpenVINO model")
    compiled = ov.Core().compile_model(ov_model, "CPU", openvino_config(precision))
    result = compiled.create_infer_request().infer({INPUT_NAME: images.numpy()})
    return {out.get_any_name(): np.array(result[out]) for out in compiled.outputs}


def _quantize(ov_model: Any, images: np.ndarray) -> Any:
    """Post-training int8 quantization of the OpenVINO model by NNCF, calibrated on `images` (one at a time)."""
    nncf = require("nncf", "int8 quantization (OpenVINO export --precision int8)")
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))], lambda x: {INPUT_NAME: x})
    # the colour check's own branch stays unquantized: its texture contrast is a small difference of two averages,
    # which int8 activations erase (every image came out unknown)
    colour = nncf.IgnoredScope(names=colour_operations(ov_model), validate=False)
    try:
        return nncf.quantize(ov_model, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.MIXED,
                             model_type=nncf.ModelType.TRANSFORMER, fast_bias_correction=True, ignored_scope=colour)
    except Exception as exc:
        raise ExportError(f"int8 quantization failed ({type(exc).__name__}: {exc})") from exc


def _export_openvino(model: DeployModel, meta: dict[str, Any], precision: str,
                     calibration: np.ndarray | None = None) -> tuple[Any, float, tuple[Tensor, dict[str, Tensor]]]:
    """The model as an OpenVINO model with the metadata in its rt_info (``onenip`` -> key -> string; precision too:
    `OpenVinoRuntime` compiles it at that precision), checked in float32 against PyTorch on a fresh batch before
    int8 quantization; the largest map difference of that check; and that batch with PyTorch's outputs (with which
    `_save_openvino` checks a bf16 or int8 file as written)."""
    if precision == "int8" and calibration is None:
        raise ExportError("int8 quantization needs calibration images")
    ov_model = _openvino_model(model)
    check = _example_images(CHECK_BATCH, model.size, seed=1)
    with torch.no_grad():
        want = model(check)
    try:
        got = _run_openvino(ov_model, "fp32", check)
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot run the converted model on {CHECK_BATCH} images ({exc})") from exc
    diff = _check_outputs(got, want, "the OpenVINO export")
    if precision == "int8":
        assert calibration is not None
        log.info(f"int8: calibrating on {len(calibration)} normal training images")
        ov_model = _quantize(ov_model, calibration)
    for key, value in encode_meta(meta).items():
        ov_model.set_rt_info(value, [METADATA_PREFIX, key])
    # for other OpenVINO tools (benchmark_app, OVMS): the precision the file is meant to run at
    ov_model.set_rt_info(OPENVINO_PRECISION_HINT[precision],
                         ["runtime_options", "INFERENCE_PRECISION_HINT"])
    return ov_model, diff, (check, want)


def _check_low_precision(ov_model: Any, precision: str, reference: tuple[Tensor, dict[str, Tensor]]) -> None:
    """A bf16 or int8 model must give finite outputs of the right shapes on the `reference` batch (images, PyTorch's
    outputs); its agreement with PyTorch is measured by tests and benchmarks/cpu_speed.py on real images: on random
    ones, bf16 noise decides nothing."""
    check, want = reference
    try:
        got = _run_openvino(ov_model, precision, check)
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot run the model at {precision} on {CHECK_BATCH} images ({exc})") from exc
    bad = [k for k in ("score", "map", "similarity") if got[k].shape != tuple(want[k].shape)
           or not np.isfinite(got[k]).all()]
    if bad:
        raise ExportError(f"the OpenVINO export at {precision} gives non-finite or misshapen outputs {bad}")
    rel = float(np.abs(got["score"] - want["score"].numpy()).max() / max(float(want["score"].abs().max()), 1e-12))
    log.info(f"OpenVINO {precision}: largest relative score difference from PyTorch on random images {rel:.2g}")


def _save_openvino(ov_model: Any, out: Path, precision: str, reference: tuple[Tensor, dict[str, Tensor]]) -> None:
    """Write the .xml and its .bin atomically: both into a temporary folder beside `out`, then renamed, the .bin
    first (an .xml is never there without its weights). A bf16 file gets its stem kept in float32
    (`onenip.deploy.stem_precision`); a bf16 or int8 file is read back from the temporary folder and checked at its
    precision (`_check_low_precision`) before it is moved into place."""
    ov = require("openvino", "exporting to OpenVINO")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        xml = Path(tmp) / "model.xml"
        try:
            ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot save the model ({type(exc).__name__}: {exc})") from exc
        if precision == "bf16":
            marked = mark_float32(xml)
            if marked:
                log.info(f"bf16: {marked} layers of the stem and the colour check marked to stay in float32")
            else:
                log.warning("bf16: no convolution stem or colour check found to keep in float32; the whole model runs "
                            "in bf16")
        elif precision == "int8":  # its unquantized rest runs in bf16: the colour check (not quantized) in float32
            marked = mark_float32(xml, stem=False)
            if marked:
                log.info(f"int8: {marked} layers of the colour check left unquantized and marked to stay in float32")
        if precision != "fp32":
            try:
                written = ov.Core().read_model(str(xml))
            except Exception as exc:
                raise ExportError(f"OpenVINO cannot read the saved model back ({type(exc).__name__}: {exc})") from exc
            _check_low_precision(written, precision, reference)
            del written  # OpenVINO maps the .bin it read: let go of it before the file is moved (Windows)
        os.replace(xml.with_suffix(".bin"), out.with_suffix(".bin"))
        try:
            os.replace(xml, out)
        except OSError as exc:  # the .bin is in place but not its .xml: an earlier pair there is broken, say so
            out.with_suffix(".bin").unlink(missing_ok=True)
            raise ExportError(f"cannot write {out} ({exc}); its .bin had been replaced and is removed: an earlier "
                              f"export there is incomplete now, export again") from exc


def default_output(checkpoint: str | Path, fmt: str) -> Path:
    """Where an export goes by default: beside the checkpoint, ``<stem>.onnx`` / ``<stem>.torchscript.pt`` /
    ``<stem>.xml`` (inside a run folder given as the checkpoint: ``model.onnx`` / ...)."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / f"model{FORMATS[fmt]}"
    return path.with_name(path.stem + FORMATS[fmt])


DEFAULT_OPSET = 17


def export_model(checkpoint: str | Path, fmt: str, output: str | Path | None = None, opset: int | None = None,
                 precision: str | None = None) -> Path:
    """Export a trained model (its checkpoint must hold a deployment) as one self-contained file; returns its path.

    Args:
        checkpoint: model.safetensors of a training run (or a checkpoint / run folder `Detector.load` accepts).
        fmt: ``"onnx"`` (an ONNX model, opset `opset`, input ``images`` uint8 (N, 3, S, S), outputs score,
            normalized, anomalous, category, similarity, map, known, type_distance, colour_distance, metadata in
            ``metadata_props``),
            ``"torchscript"`` (``torch.jit.trace`` of `DeployModel`, saved with ``torch.jit.save``; returns a dict of
            the same outputs; metadata in the extra file ``onenip.json``; read it with `load_torchscript`) or
            ``"openvino"`` (OpenVINO IR: ``<name>.xml`` and ``<name>.bin``, converted from PyTorch by OpenVINO's converter,
            the same input and outputs, metadata in the rt_info under ``onenip``; run it with
            `onenip.deploy.runtimes.OpenVinoRuntime` or `Predictor.load`).
        output: the file to write (an existing folder: the default name inside it). Default: beside the checkpoint,
            ``<stem>.onnx``, ``<stem>.torchscript.pt`` or ``<stem>.xml``.
        opset: ONNX opset version, 14 to 20 (default: 17); ONNX only.
        precision: OpenVINO only: ``"fp32"`` (the default), ``"bf16"`` (the same graph, run with bf16 inference
            precision: AMX / AVX-512 BF16 CPUs; the backbone's stem marked to stay in float32, see
            `onenip.deploy.stem_precision`) or ``"int8"`` (post-training quantization by NNCF, calibrated on up to
            `CALIBRATION_IMAGES` of the model's own normal training images: see `calibration_images`).

    The file is written atomically (temporary file, then rename), and only after the export has been loaded back
    and checked against PyTorch on a batch of another size: a failed export leaves no file and an existing file at
    `output` untouched. The check's largest map difference is logged (INFO, logger ``onenip.deploy.export``).

    Raises:
        ConfigError: unknown format, opset or precision, an opset for a format other than ONNX, a precision other
            than fp32 for a format other than OpenVINO.
        CheckpointError: the checkpoint cannot be read or holds no deployment (prompt pool and thresholds).
        MissingDependencyError: ONNX export without the onnx or onnxruntime packages (``pip install 'onenip[onnx]'``),
            OpenVINO export without openvino (or, for int8, nncf) (``pip install 'onenip[openvino]'``).
        DatasetError: int8 without the model's training images (see `calibration_images`).
        ExportError: PyTorch cannot export the model, or the exported file computes something else.
    """
    kind = str(fmt).strip().lower()
    if kind not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if kind != "onnx" and opset is not None:
        raise ConfigError(f"an ONNX opset was given ({opset}) for the {kind} format; opsets are ONNX's only")
    level = "fp32" if precision is None else str(precision).strip().lower()
    if level not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if kind != "openvino" and level != "fp32":
        raise ConfigError(f"--precision {level} applies to the openvino format only ({kind} files run in float32)")
    onnx_opset = DEFAULT_OPSET if opset is None else int(opset)
    if kind == "onnx":
        if not OPSET_RANGE[0] <= onnx_opset <= OPSET_RANGE[1]:
            raise ConfigError(f"ONNX opset must be between {OPSET_RANGE[0]} and {OPSET_RANGE[1]}, got {opset}")
    if kind == "onnx":
        require("onnx", "exporting to ONNX")
        require("onnxruntime", "checking the ONNX export")
    if kind == "openvino":
        require("openvino", "exporting to OpenVINO")
        if level == "int8":
            require("nncf", "int8 quantization (OpenVINO export --precision int8)")
    detector = Detector.load(checkpoint)
    if detector.deployment is None:
        raise CheckpointError(f"{checkpoint} has no prompt pool and thresholds, so there is nothing to export; run "
                              "`onenip calibrate MODEL --output NEW.safetensors`, or export the run's model.safetensors")
    model = DeployModel(detector, detector.deployment).cpu().eval().requires_grad_(False)  # no autograd when run
    out = Path(output) if output is not None else default_output(checkpoint, kind)
    if out.is_dir():
        out = out / default_output(checkpoint, kind).name
    check_output_file(out, "output", models=True)  # never over a model or a training checkpoint
    if kind == "openvino":
        if out.suffix.lower() != ".xml":
            raise ConfigError(f"output {out}: an OpenVINO model is an .xml file (and the .bin beside it)")
        check_output_file(out.with_suffix(".bin"), "output", models=True)
    meta = export_metadata(model, source=Path(checkpoint).name, precision=level)
    scores = detector.deployment.normal_scores
    if scores:  # the held-out normal scores: Predictor(..., far=RATE) sets thresholds from them, file or checkpoint
        meta["normal_scores"] = scores
    if kind == "openvino":
        calibration = calibration_images(detector) if level == "int8" else None
        ov_model, diff, reference = _export_openvino(model, meta, level, calibration)
        log.info(f"OpenVINO outputs (float32) match PyTorch's on {CHECK_BATCH} random images: largest map difference "
                 f"{diff:.2g}")
        _save_openvino(ov_model, out, level, reference)
        return out
    data, diff = _export_onnx(model, meta, onnx_opset) if kind == "onnx" else _export_torchscript(model, meta)
    name = "ONNX" if kind == "onnx" else "TorchScript"
    log.info(f"{name} outputs match PyTorch's on {CHECK_BATCH} random images: largest map difference {diff:.2g}")
    atomic_write_bytes(out, data)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Using exported files
# --------------------------------------------------------------------------------------------------------------------


class OnnxPredictor(OnnxRuntime):
    """An exported ONNX model run by onnxruntime on the CPU: everything it needs is in the file (the ONNX case of
    `onenip.deploy.runtimes.open_runtime`, with the category names added to the outputs).

        predictor = OnnxPredictor("model.onnx")
        out = predictor.predict(images)  # uint8 (N, 3, S, S), RGB
        out["anomalous"], out["category_names"], out["map"]
    """

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images (N, 3, S, S) -> the model's outputs (score, normalized, anomalous, category, similarity,
        map, known, type_distance, colour_distance) as numpy arrays, plus ``category_names`` (N,) str."""
        out = self.run(images)
        out["category_names"] = np.array([self.categories[int(i)] for i in out["category"]], dtype=str)
        return out

    __call__ = predict
