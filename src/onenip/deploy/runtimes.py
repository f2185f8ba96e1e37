"""Running an exported model file: one interface for every runtime.

`open_runtime(path)` chooses the runtime by the file's suffix:

- ``.onnx``: ONNX Runtime (``pip install 'onenip[onnx]'``);
- ``.xml`` (with its ``.bin`` beside it): OpenVINO (``pip install 'onenip[openvino]'``), at the precision the file
  was exported for (``fp32``, ``bf16`` or ``int8``: the ``onenip.precision`` metadata);
- ``.torchscript.pt`` (or ``.pt``): TorchScript (torch alone).

Every `Runtime` maps uint8 images (N, 3, S, S) RGB, as a numpy array, to a dict of numpy arrays with the keys of
`onenip.models.inference.DeployModel`'s output (score, normalized, anomalous, category, similarity, map, known,
type_distance, colour_distance: whatever the file computes; a file exported before one of the last three was an
output lacks it), and
carries the metadata written at export (`meta`: categories, input size, thresholds, onenip version, precision, ...).
None of them needs the checkpoint, the training data or onenip's model code.

    runtime = open_runtime("model.xml")
    out = runtime.run(images)          # uint8 (N, 3, S, S)
    out["anomalous"], [runtime.categories[i] for i in out["category"]], out["map"]
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from onenip.errors import CheckpointError, ConfigError, MissingDependencyError

INPUT_NAME = "images"
OUTPUT_NAMES: tuple[str, ...] = ("score", "normalized", "anomalous", "category", "similarity", "map", "known",
                                 "type_distance", "colour_distance")
"""Outputs of an exported file, in this order (ONNX and OpenVINO output names; TorchScript dict keys)."""
METADATA_FILE = "onenip.json"
"""Name of the TorchScript extra file holding the metadata."""
METADATA_PREFIX = "onenip"
"""ONNX ``metadata_props`` keys are ``onenip.<key>``; OpenVINO ``rt_info`` holds them under ``onenip`` -> ``<key>``."""
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "openvino": "openvino", "nncf": "openvino"}
"""The onenip extra that installs each optional package."""
SUFFIXES: dict[str, str] = {".onnx": "onnxruntime", ".xml": "openvino", ".torchscript.pt": "torchscript", ".pt": "torchscript"}
"""File suffix -> the runtime that runs it (the longest matching suffix wins)."""
OPENVINO_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
"""OpenVINO's INFERENCE_PRECISION_HINT per exported precision. int8: the quantized layers run in int8 and the rest in
bf16 where the CPU has bf16 (AVX-512 BF16 or AMX; OpenVINO falls back to f32 elsewhere)."""
PRECISIONS = tuple(OPENVINO_PRECISION_HINT)


def install_hint(module: str) -> str:
    return f"pip install 'onenip[{EXTRAS.get(module, module)}]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency or raise MissingDependencyError naming the onenip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module}, which is not installed: {install_hint(module)}"
        ) from None


def runtime_name(path: str | Path) -> str | None:
    """The runtime that runs an exported file (by its suffix), or None for anything else (a checkpoint)."""
    name = Path(path).name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def is_exported(path: str | Path) -> bool:
    """Whether `path` names an exported model file (.onnx, .xml, .torchscript.pt / .pt) rather than a checkpoint."""
    return runtime_name(path) is not None


def encode_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as strings for a file's key-value store (ONNX metadata_props, OpenVINO rt_info): every value as JSON,
    strings too, so that `decode_meta` gives back exactly what was written (a version "1" stays a string)."""
    return {key: json.dumps(value) for key, value in meta.items()}


def decode_meta(props: Mapping[str, str], where: str) -> dict[str, Any]:
    """``{key: value}`` from `encode_meta`'s strings (a value that is not JSON, as files of onenip 0.x before it
    wrote strings, is kept as the string); CheckpointError when the onenip keys are missing."""
    meta: dict[str, Any] = {}
    for key, text in props.items():
        try:
            meta[key] = json.loads(text)
        except ValueError:
            meta[key] = text
    return check_meta(meta, where)


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """`meta` if it is onenip's export metadata (categories and an integer input size), else CheckpointError."""
    if not isinstance(meta, dict) or "categories" not in meta or "input_size" not in meta:
        raise CheckpointError(f"{where} is not a model exported by onenip (no onenip metadata)")
    if not isinstance(meta["input_size"], int) or meta["input_size"] < 1:
        raise CheckpointError(f"{where}: its onenip metadata has no valid input size ({meta['input_size']!r})")
    return meta


def _threads(threads: int) -> int:
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0: the runtime's default), got {threads}")
    return threads


class Runtime:
    """An exported model, ready to run: `run(images)` -> dict of numpy arrays (see the module docstring).

    Attributes: `path`, `name` (onnxruntime, openvino, torchscript), `meta` (the metadata written at export),
    `categories` (index -> product type), `size` (input side S), `thresholds` (type -> raw-score threshold),
    `precision` (fp32, bf16, int8), `outputs` (the output names the file computes)."""

    name = ""

    def __init__(self, path: str | Path, meta: dict[str, Any], outputs: list[str]) -> None:
        self.path = Path(path)
        self.meta = meta
        self.categories: list[str] = list(meta["categories"])
        self.size = int(meta["input_size"])
        self.thresholds: dict[str, float] = {k: float(v) for k, v in dict(meta.get("thresholds", {})).items()}
        self.precision = str(meta.get("precision", "fp32"))
        self.outputs = outputs

    def check(self, images: np.ndarray) -> np.ndarray:
        """`images` as a C-contiguous uint8 (N, 3, S, S) array with N >= 1, or ValueError."""
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, self.size, self.size) \
                or len(images) == 0:
            raise ValueError(f"expected uint8 images of shape (N, 3, {self.size}, {self.size}) with N >= 1, got "
                             f"{images.dtype} {images.shape}")
        return images

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images (N, 3, S, S) -> the file's outputs as numpy arrays (bool decisions, int64 categories)."""
        out = self._run(self.check(images))
        if "anomalous" in out:
            out["anomalous"] = out["anomalous"].astype(bool, copy=False)
        if "known" in out:
            out["known"] = out["known"].astype(bool, copy=False)
        if "category" in out:
            out["category"] = out["category"].astype(np.int64, copy=False)
        return out

    __call__ = run

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, precision={self.precision!r}, categories={self.categories})"


class OnnxRuntime(Runtime):
    """An ``.onnx`` file run by ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        ort = require("onnxruntime", "running an ONNX model")
        options = ort.SessionOptions()
        if _threads(threads):
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot load {path}: {exc}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        prefix = METADATA_PREFIX + "."
        meta = decode_meta({k[len(prefix):]: v for k, v in props.items() if k.startswith(prefix)}, str(path))
        super().__init__(path, meta, [o.name for o in self.session.get_outputs()])

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, {INPUT_NAME: images})))


def openvino_config(precision: str, threads: int = 0, hint: str = "LATENCY") -> dict[str, Any]:
    """compile_model properties for an exported precision: INFERENCE_PRECISION_HINT (set even for fp32: on a CPU with
    AMX OpenVINO's default is bf16), the threads (0: OpenVINO's default, all cores) and the performance hint."""
    if precision not in OPENVINO_PRECISION_HINT:
        raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if hint not in ("LATENCY", "THROUGHPUT"):
        raise ConfigError(f"unknown OpenVINO performance hint {hint!r}: use LATENCY or THROUGHPUT")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINT[precision], "PERFORMANCE_HINT": hint}
    if _threads(threads):
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def openvino_meta(model: Any, where: str) -> dict[str, Any]:
    """The onenip metadata of an OpenVINO model (rt_info ``onenip`` -> key -> string)."""
    if not model.has_rt_info([METADATA_PREFIX]):
        raise CheckpointError(f"{where} is not a model exported by onenip (no {METADATA_PREFIX} rt_info)")
    info = model.get_rt_info()[METADATA_PREFIX]
    props = {str(k): info[k].astype(str) for k in info}  # each value an OVAny holding a string
    return decode_meta(props, where)


class OpenVinoRuntime(Runtime):
    """An OpenVINO IR (``.xml`` + ``.bin``) run by OpenVINO on the CPU, at the file's precision (``precision``
    overrides it: "fp32" runs a bf16 export in float32; an int8 file stays int8 in its quantized layers).

    ``hint="LATENCY"`` (default): one inference stream, all threads on each call: the shortest time for one image.
    ``hint="THROUGHPUT"``: OpenVINO's streams (each a share of the threads), and a batch is split across them and run
    at once: more images per second for batches, a longer wait for a single image."""

    name = "openvino"

    def __init__(self, path: str | Path, threads: int = 0, precision: str | None = None, device: str = "CPU",
                 hint: str = "LATENCY") -> None:
        ov = require("openvino", "running an OpenVINO model")
        path = Path(path)
        if path.is_file() and path.stat().st_size == 0:
            raise CheckpointError(f"{path}: an empty file")
        if not path.with_suffix(".bin").is_file() and path.is_file():
            raise CheckpointError(f"{path}: its weights {path.with_suffix('.bin').name} are missing (an OpenVINO model "
                                  "is the .xml and the .bin beside it)")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:
            raise CheckpointError(f"OpenVINO cannot read {path}: {exc}") from None
        meta = openvino_meta(model, str(path))
        precision = precision or str(meta.get("precision", "fp32"))
        try:
            self.compiled = core.compile_model(model, device, openvino_config(precision, threads, hint))
        except ConfigError:
            raise
        except Exception as exc:
            raise CheckpointError(f"OpenVINO cannot compile {path} for {device}: {exc}") from None
        streams = int(self.compiled.get_property("NUM_STREAMS")) if hint == "THROUGHPUT" else 1
        self.requests = [self.compiled.create_infer_request() for _ in range(max(streams, 1))]  # one per stream
        super().__init__(path, meta, [o.get_any_name() for o in self.compiled.outputs])
        self.precision = precision  # the precision compiled (an override included)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        used = self.requests[: min(len(self.requests), len(images))]
        for request, part in zip(used, np.array_split(images, len(used))):  # one part per stream, run at once
            request.start_async({INPUT_NAME: np.ascontiguousarray(part)})
        for request in used:
            request.wait()
        return {name: np.concatenate([request.get_tensor(out).data for request in used])  # one copy of each output
                for name, out in zip(self.outputs, self.compiled.outputs)}


def load_torchscript(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(module, metadata) of an exported TorchScript file, on the CPU; the module maps uint8 images (N, 3, S, S) to
    the dict of outputs. Needs only torch (no onenip model code)."""
    import torch

    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[METADATA_FILE] or "null")
    except Exception as exc:
        raise CheckpointError(f"cannot read the TorchScript model {path}: {exc}") from None
    return module.eval(), check_meta(meta, f"the TorchScript model {path}")


class TorchScriptRuntime(Runtime):
    """A ``.torchscript.pt`` file run by torch.jit on the CPU (torch alone)."""

    name = "torchscript"

    def __init__(self, path: str | Path, threads: int = 0) -> None:

        _threads(threads)
        module, meta = load_torchscript(path)
        self.module = module
        self.threads = threads
        super().__init__(path, meta, list(meta.get("outputs", OUTPUT_NAMES)))

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                out = self.module(torch.from_numpy(images))
        finally:
            if self.threads:
                torch.set_num_threads(before)
        return {k: v.numpy() for k, v in out.items()}


OPENERS: dict[str, Callable[..., Runtime]] = {"onnxruntime": OnnxRuntime, "openvino": OpenVinoRuntime,
                                              "torchscript": TorchScriptRuntime}


def open_runtime(path: str | Path, threads: int = 0, hint: str | None = None, **options: Any) -> Runtime:
    """The exported file `path` with the runtime its suffix names (.onnx: ONNX Runtime, .xml: OpenVINO,
    .torchscript.pt / .pt: TorchScript); `threads` (0: the runtime's default); `hint`, OpenVINO's performance hint
    (LATENCY or THROUGHPUT; the other runtimes have none and ignore it); and, for OpenVINO, `precision` and `device`.

    Raises:
        CheckpointError: no such file, not an exported model, or one the runtime cannot load.
        MissingDependencyError: the runtime's package is not installed (the message names the onenip extra).
    """
    path = Path(path)
    kind = runtime_name(path)
    if kind is None:
        raise CheckpointError(f"{path}: not an exported model file (.onnx, .xml, .torchscript.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if kind == "openvino" and hint is not None:
        options["hint"] = hint
    return OPENERS[kind](path, threads=threads, **options)
