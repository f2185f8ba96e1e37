"""Exporting a trained model as one self-contained file: ONNX (for onnxruntime and other ONNX runtimes) or TorchScript.

The exported graph is the whole `DeployModel`: uint8 images (N, 3, S, S) in RGB -> backbone features -> retrieval of
the most similar prompt of the pool -> reconstruction -> fused anomaly map -> score and decision. The prompt pool, the
per-category thresholds and the fusion constant are constants inside the file: neither onenip, its training data nor
the checkpoint is needed to run it. N is dynamic; S is the model's input size (fixed).

Outputs, in this order (ONNX output names; keys of the TorchScript module's dict):

- ``score`` (N,) float32: the raw score, maximum of the average-pooled anomaly map;
- ``normalized`` (N,) float32: 1 - 2^(-score / threshold), 0.5 at the threshold;
- ``anomalous`` (N,) bool: score > threshold of the retrieved category;
- ``category`` (N,) int64: index of the retrieved category, into the ``categories`` list of the metadata;
- ``similarity`` (N,) float32: cosine similarity to the retrieved prompt;
- ``map`` (N, S, S) float32: the fused anomaly map at the input size.

Metadata: ONNX files carry ``metadata_props`` (``onenip.categories`` a JSON list, ``onenip.input_size``,
``onenip.thresholds`` a JSON object category -> raw-score threshold, ``onenip.version``, ...), TorchScript files an
extra file ``onenip.json`` with the same keys (without the ``onenip.`` prefix). `OnnxPredictor` shows how little is
needed to use an ONNX file; `load_torchscript` reads a TorchScript file and its metadata.

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): in torch 2.14 it is
deprecated but present, exports this model in about a second and needs no package beyond ``onnx``; the
``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9) gives the same graph here but takes
~20x longer and needs ``onnxscript``. TorchScript (``torch.jit.trace``/``save``/``load``) is likewise deprecated in
torch 2.14 but works; the deprecation warnings are silenced while exporting. Every export is checked before it is
written: the file is loaded back (ONNX: ``onnx.checker`` and an onnxruntime session) and run on a batch of a size
other than the one traced, and its maps must match PyTorch's.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from onenip.checkpoint import atomic_write_bytes, check_output_file
from onenip.errors import CheckpointError, ConfigError, ExportError, MissingDependencyError, OnenipError
from onenip.models.detector import Detector
from onenip.models.inference import DeployModel

log = logging.getLogger(__name__)

FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
"""Export formats and the suffix of their default file name."""
INPUT_NAME = "images"
OUTPUT_NAMES: tuple[str, ...] = ("score", "normalized", "anomalous", "category", "similarity", "map")
OPSET_RANGE = (14, 20)
"""ONNX opsets the TorchScript-based exporter handles for this model (scaled_dot_product_attention needs 14)."""
INSTALL_HINT = "pip install 'onenip[onnx]'"
METADATA_FILE = "onenip.json"
"""Name of the TorchScript extra file holding the metadata."""
TRACE_BATCH, CHECK_BATCH = 2, 3
"""Batch size of the example traced, and of the check run on the written file (a different one: N is dynamic)."""
CHECK_ATOL, CHECK_RTOL = 1e-4, 1e-5
"""Largest |exported - PyTorch| the export check allows: CHECK_ATOL + CHECK_RTOL * (largest |PyTorch map value|)."""


def _require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency or raise MissingDependencyError with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module}, which is not installed: {INSTALL_HINT}"
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------------


def export_metadata(model: DeployModel, source: str | None = None) -> dict[str, Any]:
    """What a user of the exported file needs besides the graph: category names (index order), input size,
    thresholds (as float32, the values the graph compares against), the outputs, the versions."""
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
        "fusion_alpha": model.alpha,
        "fusion_scale": model.scale,
        "score_kernel": model.kernel,
        "backbone": getattr(model.extractor, "name", ""),
        "source": source or "",
    }


def _onnx_props(meta: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as ONNX metadata_props: ``onenip.<key>``, strings as they are, everything else as JSON."""
    return {f"onenip.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


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
    for name in ("score", "map", "similarity"):
        a, b = np.asarray(got[name], dtype=np.float64), want[name].numpy().astype(np.float64)
        if a.shape != b.shape:
            raise ExportError(f"{what}: output {name} has shape {a.shape}, PyTorch's {b.shape}")
        diffs[name] = float(np.abs(a - b).max()) if a.size else 0.0
    if not all(math.isfinite(d) and d <= allowed for d in diffs.values()):
        raise ExportError(f"{what} does not compute what PyTorch computes: largest differences {diffs} "
                          f"(allowed {allowed:.3g})")
    return diffs["map"]


def _export_onnx(model: DeployModel, meta: dict[str, Any], opset: int) -> tuple[bytes, float]:
    """The model as ONNX bytes, with metadata, validated by onnx.checker and run once by onnxruntime; and the largest
    difference of its maps from PyTorch's."""
    onnx = _require("onnx", "exporting to ONNX")
    ort = _require("onnxruntime", "checking the ONNX export")
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


def default_output(checkpoint: str | Path, fmt: str) -> Path:
    """Where an export goes by default: beside the checkpoint, ``<stem>.onnx`` / ``<stem>.torchscript.pt`` (inside
    a run folder given as the checkpoint: ``model.onnx`` / ``model.torchscript.pt``)."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / f"model{FORMATS[fmt]}"
    return path.with_name(path.stem + FORMATS[fmt])


DEFAULT_OPSET = 17


def export_model(checkpoint: str | Path, fmt: str, output: str | Path | None = None, opset: int | None = None) -> Path:
    """Export a trained model (its checkpoint must hold a deployment) as one self-contained file; returns its path.

    Args:
        checkpoint: model.safetensors of a training run (or a checkpoint / run folder `Detector.load` accepts).
        fmt: ``"onnx"`` (an ONNX model, opset `opset`, input ``images`` uint8 (N, 3, S, S), outputs score,
            normalized, anomalous, category, similarity, map, metadata in ``metadata_props``) or ``"torchscript"``
            (``torch.jit.trace`` of `DeployModel`, saved with ``torch.jit.save``; returns a dict of the same
            outputs; metadata in the extra file ``onenip.json``; read it with `load_torchscript`).
        output: the file to write (an existing folder: the default name inside it). Default: beside the checkpoint,
            ``<stem>.onnx`` or ``<stem>.torchscript.pt``.
        opset: ONNX opset version, 14 to 20 (default: 17); ONNX only.

    The file is written atomically (temporary file, then rename), and only after the export has been loaded back
    and checked against PyTorch on a batch of another size: a failed export leaves no file and an existing file at
    `output` untouched. The check's largest map difference is logged (INFO, logger ``onenip.deploy.export``).

    Raises:
        ConfigError: unknown format or opset, or an opset for TorchScript.
        CheckpointError: the checkpoint cannot be read or holds no deployment (prompt pool and thresholds).
        MissingDependencyError: ONNX export without the onnx or onnxruntime packages (``pip install 'onenip[onnx]'``).
        ExportError: PyTorch cannot export the model, or the exported file computes something else.
    """
    kind = str(fmt).strip().lower()
    if kind not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if kind != "onnx" and opset is not None:
        raise ConfigError(f"an ONNX opset was given ({opset}) for the {kind} format; opsets are ONNX's only")
    onnx_opset = DEFAULT_OPSET if opset is None else int(opset)
    if kind == "onnx":
        if not OPSET_RANGE[0] <= onnx_opset <= OPSET_RANGE[1]:
            raise ConfigError(f"ONNX opset must be between {OPSET_RANGE[0]} and {OPSET_RANGE[1]}, got {opset}")
        _require("onnx", "exporting to ONNX")
        _require("onnxruntime", "checking the ONNX export")
    detector = Detector.load(checkpoint)
    if detector.deployment is None:
        raise CheckpointError(f"{checkpoint} has no prompt pool and thresholds, so there is nothing to export; run "
                              "`onenip calibrate MODEL --output NEW.safetensors`, or export the run's model.safetensors")
    model = DeployModel(detector, detector.deployment).cpu().eval().requires_grad_(False)  # no autograd when run
    out = Path(output) if output is not None else default_output(checkpoint, kind)
    if out.is_dir():
        out = out / default_output(checkpoint, kind).name
    check_output_file(out, "output", models=True)  # never over a model or a training checkpoint
    meta = export_metadata(model, source=Path(checkpoint).name)
    data, diff = _export_onnx(model, meta, onnx_opset) if kind == "onnx" else _export_torchscript(model, meta)
    name = "ONNX" if kind == "onnx" else "TorchScript"
    log.info(f"{name} outputs match PyTorch's on {CHECK_BATCH} random images: largest map difference {diff:.2g}")
    atomic_write_bytes(out, data)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Using exported files
# --------------------------------------------------------------------------------------------------------------------


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """(module, metadata) of an exported TorchScript file, on the CPU; the module maps uint8 images (N, 3, S, S) to
    the dict of outputs. Needs only torch (no onenip model code)."""
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_tracing():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[METADATA_FILE] or "null")
    except Exception as exc:
        raise CheckpointError(f"cannot read the TorchScript model {path}: {exc}") from None
    if not isinstance(meta, dict) or "categories" not in meta:
        raise CheckpointError(f"{path} is not a TorchScript model exported by onenip (no {METADATA_FILE})")
    return module.eval(), meta


class OnnxPredictor:
    """An exported ONNX model run by onnxruntime on the CPU: everything it needs is in the file.

        predictor = OnnxPredictor("model.onnx")
        out = predictor.predict(images)  # uint8 (N, 3, S, S), RGB
        out["anomalous"], out["category_names"], out["map"]
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        """`threads`: onnxruntime's intra-op threads (0: its default)."""
        ort = _require("onnxruntime", "running an ONNX model")
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot load {path}: {exc}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if "onenip.categories" not in props or "onenip.input_size" not in props:
            raise CheckpointError(f"{path} is not an ONNX model exported by onenip (no onenip.* metadata)")
        self.categories: list[str] = json.loads(props["onenip.categories"])
        self.size = int(props["onenip.input_size"])
        self.thresholds: dict[str, float] = json.loads(props.get("onenip.thresholds", "{}"))
        self.outputs = [o.name for o in self.session.get_outputs()]

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images (N, 3, S, S) -> the model's outputs (score, normalized, anomalous, category, similarity,
        map) as numpy arrays, plus ``category_names`` (N,) str."""
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, self.size, self.size) \
                or len(images) == 0:
            raise ValueError(f"expected uint8 images of shape (N, 3, {self.size}, {self.size}) with N >= 1, got "
                             f"{images.dtype} {images.shape}")
        out = dict(zip(self.outputs, self.session.run(self.outputs, {INPUT_NAME: images})))
        out["category_names"] = np.array([self.categories[int(i)] for i in out["category"]], dtype=str)
        return out

    __call__ = predict
