"""Keeping an OpenVINO model's stem, and its colour check, in float32 when it runs at bf16.

Run wholly in bf16, a trained model takes another decision than float32 PyTorch on about 1.2-1.5 % of iad-mix's test
images (good <-> defective for images scored near their threshold, and known images judged `unknown`). Most of that
comes from the first layers, which work on the image itself at the highest resolution: bf16 keeps 8 significant bits,
about as many as the pixels carry. Keeping the *stem* in float32 (the convolutions at the first one's resolution up
to where the features widen, and everything that feeds them: the image's conversion and normalisation;
`stem_layers`) brought the turned decisions from 15 to 5 of 1,227 for the line network and from 19 to 5 for the
default one, for a few per cent of the throughput (docs/benchmarks.md, "Where bf16 turns decisions"). The colour half
of the product-type check (`colour_layers`: the median colour and its Mahalanobis distance) is kept in float32 too:
in bf16 its distances moved by 1-2.5 % (median) and up to 2x on iad-mix's test images, about as far as the types'
colours lie apart, for a branch of a few small operations.

What OpenVINO 2026.4 makes of it on a CPU with AMX, for tf_efficientnet_lite0: the stem's depthwise and pointwise
convolutions (the first block) run in float32; the very first convolution and the normalisation before it still run in bf16,
because OpenVINO rewrites both into new nodes (the division by the std into a multiplication; the explicit padding in
front of the convolution, TensorFlow's "same" padding, fused into it), and a new node does not inherit the mark (the
attribute is not copied). A test checks that marked convolutions run in float32 and the network's in bf16.

How: OpenVINO's CPU plugin leaves a node at its original precision when the node's runtime info holds the
``DisablePrecisionConversion`` attribute with conversion to f16 disabled, under a bf16 inference precision as well
(OpenVINO 2026.4). OpenVINO's Python API cannot create that attribute, but its IR reader does, from the attribute
written in the ``.xml``: ``mark_float32`` adds it to those layers of a saved model (`onenip.deploy.export` calls it
on the bf16 file before the file is read back, checked and moved into place). In a float32 run the attribute changes
nothing. OpenVINO honours it from 2026.3 on (checked: 2026.3.0 and 2026.4.1 run the marked convolutions in float32);
2025.1 to 2026.2 read the file and ignore the mark, so the whole model runs in bf16 there (the `openvino` extra asks
for 2026.3 or later).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from onenip.errors import ExportError

__all__ = ["KEEP_FP32", "CONVOLUTIONS", "stem_layers", "colour_layers", "colour_operations", "mark_float32",
           "marked_layers"]

KEEP_FP32 = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
"""The rt_info attribute, as OpenVINO's IR spells it, that keeps a layer at its original precision (float32)."""
CONVOLUTIONS = ("Convolution", "GroupConvolution")
"""The IR layer types that count as convolutions when finding the stem."""
_UNMARKED = ("Parameter", "Const")  # no computation of their own: nothing to keep
COLOUR_OUTPUT, SCORE_OUTPUT = "colour_distance", "score"  # the deployed model's outputs (onenip.deploy.runtimes)


def _has_mark(layer: ET.Element) -> bool:
    return any(a.get("name") == KEEP_FP32["name"] and a.get("value") == KEEP_FP32["value"]
               for a in layer.iterfind("rt_info/attribute"))


def _graph(root: ET.Element) -> tuple[dict[str, ET.Element], dict[str, list[str]]]:
    """The top-level graph of an IR's XML tree: layers by id, and each layer's parents (ids)."""
    layers = {layer.get("id", ""): layer for layer in root.iterfind("layers/layer")}
    parents: dict[str, list[str]] = defaultdict(list)
    for edge in root.iterfind("edges/edge"):
        parents[edge.get("to-layer", "")].append(edge.get("from-layer", ""))
    return layers, parents


def _upstream(layers: dict[str, Any], parents: dict[str, list[str]], start: list[str]) -> set[str]:
    """`start` and every layer they depend on."""
    seen: set[str] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node not in seen and node in layers:
            seen.add(node)
            stack.extend(parents[node])
    return seen


def _output_shape(layer: ET.Element) -> tuple[int, int] | None:
    """(channels, H * W) of the layer's first output ((N, C, H, W), static C, H and W), else None."""
    out = layer.find("output")
    port = out.find("port") if out is not None else None
    dims = [d.text or "" for d in port.findall("dim")] if port is not None else []
    if len(dims) != 4 or not all(d.isdigit() and int(d) > 0 for d in dims[1:]):
        return None
    return int(dims[1]), int(dims[2]) * int(dims[3])


def stem_layers(root: ET.Element) -> set[str]:
    """The ids of the stem's layers in an IR's XML tree (the ``<net>`` element), and of every layer they depend on.

    The stem: the convolutions at the resolution of the first convolution (the one nearest the input), behind no
    convolution of another resolution or of more channels than the first one has. A decoder's convolutions, at
    whatever resolution, come after a downsampling. A squeeze-and-excitation block's, on pooled 1 x 1 features, end
    the stem: with them marked, OpenVINO 2026.4 failed to run efficientnet_b4's bf16 file ("Convolution node ... is
    not initialized"), while with the stem convolution and the first depthwise one marked it ran. Where a backbone
    widens its features at that resolution (tf_efficientnet_lite0's first expansion, 16 -> 96 channels at half the
    input's side), float32 starts to cost throughput, and the narrow layers before it are where bf16 rounding turned
    decisions. Empty when the graph has no convolution with a static 4-d output."""
    layers, parents = _graph(root)

    def upstream(start: list[str]) -> set[str]:
        return _upstream(layers, parents, start)

    shapes = {i: shape for i, layer in layers.items() if layer.get("type") in CONVOLUTIONS
              and (shape := _output_shape(layer)) is not None}
    before = {i: upstream(parents[i]) & shapes.keys() for i in shapes}  # the convolutions each one depends on
    firsts = [i for i in shapes if not before[i]]  # nearest the input
    if not firsts:
        return set()
    top = max(shapes[i][1] for i in firsts)  # the first convolution's resolution (a decoder's may be higher)
    width = max(shapes[i][0] for i in firsts if shapes[i][1] == top)  # and its channels
    stem = [i for i, (channels, area) in shapes.items() if area == top and channels <= width
            and all(shapes[j][1] == top and shapes[j][0] <= width for j in before[i])]
    return upstream(stem)


def _colour_branch(layers: dict[str, Any], parents: dict[str, list[str]], results: dict[str, str]) -> set[str]:
    """Of a graph (nodes by key, each node's parents, each output's Result node), the nodes that compute the
    `colour_distance` output and nothing the `score` output needs; empty without both outputs."""
    if COLOUR_OUTPUT not in results or SCORE_OUTPUT not in results:
        return set()
    colour = _upstream(layers, parents, parents[results[COLOUR_OUTPUT]])
    return colour - _upstream(layers, parents, parents[results[SCORE_OUTPUT]])


def colour_layers(root: ET.Element) -> set[str]:
    """The ids of the layers that compute the `colour_distance` output and nothing the `score` output needs (the
    colour check's own branch: the median colour, the type's colour model and the distance); empty for a graph
    without both outputs."""
    layers, parents = _graph(root)
    results = {layer.get("output_names", ""): i for i, layer in layers.items() if layer.get("type") == "Result"}
    return _colour_branch(layers, parents, results)


def colour_operations(model: Any) -> list[str]:
    """The names of the colour check's own operations (`colour_layers`) in an OpenVINO model in memory (an
    ``openvino.Model``, e.g. before it is quantized)."""
    layers = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    parents = {name: [i.get_source_output().get_node().get_friendly_name() for i in op.inputs()]
               for name, op in layers.items()}
    results = {tensor: out.get_node().get_friendly_name() for out in model.outputs for tensor in out.get_names()}
    return sorted(_colour_branch(layers, parents, results))


def mark_float32(xml: str | Path, stem: bool = True) -> int:
    """Add `KEEP_FP32` to the rt_info of the computing layers of the stem (`stem_layers`; not with `stem` False, as
    for an int8 file, whose stem is quantized) and of the colour check (`colour_layers`) in the IR file `xml`
    (rewritten in place: call it on a file not yet in use). Returns how many layers were marked (0: neither found,
    the file unchanged).

    Raises:
        ExportError: the file cannot be read or parsed as XML, or cannot be written back."""
    path = Path(xml)
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as exc:
        raise ExportError(f"{path}: cannot read the OpenVINO model's XML to mark its stem ({exc})") from exc
    root = tree.getroot()
    ids = (stem_layers(root) if stem else set()) | colour_layers(root)
    marked = 0
    for layer in root.iterfind("layers/layer"):
        if layer.get("id") not in ids or layer.get("type") in _UNMARKED:
            continue
        info = layer.find("rt_info")
        if info is None:
            info = ET.Element("rt_info")
            children = list(layer)
            at = next((k for k, child in enumerate(children) if child.tag in ("input", "output")), len(children))
            layer.insert(at, info)
        if not _has_mark(layer):
            ET.SubElement(info, "attribute", dict(KEEP_FP32))
        marked += 1
    if marked:
        try:
            tree.write(path, encoding="utf-8", xml_declaration=True)
        except OSError as exc:
            raise ExportError(f"{path}: cannot write the marked OpenVINO model back ({exc})") from exc
    return marked


def marked_layers(xml: str | Path) -> list[str]:
    """The names of the layers of an IR file that carry `KEEP_FP32` (in file order)."""
    root = ET.parse(Path(xml)).getroot()
    return [layer.get("name", "") for layer in root.iterfind("layers/layer") if _has_mark(layer)]
