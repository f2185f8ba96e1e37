"""Judging new images: `Predictor` (Python) and `onenip predict` (command line).

No category has to be given: each image takes the most similar prompt of the model's prompt pool, and the threshold
of that prompt's category decides. Per image: the raw score, the normalised score (0.5 = threshold), the decision, the
retrieved category and its cosine similarity, the anomaly map at the image's own size, and the defect mask (the
pixels whose map value exceeds the threshold, for images judged defective; empty otherwise).

    from onenip.deploy.predictor import Predictor
    predictor = Predictor.load("runs/x/model.safetensors")
    for p in predictor.predict(["a.png", "b.png"]):
        print(p.source, p.anomalous, p.normalized, p.category)
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from onenip.checkpoint import atomic_write_csv, atomic_write_text, check_output_folder
from onenip.data import IMAGE_EXTENSIONS
from onenip.data.files import listing, warn_unsupported
from onenip.data.images import as_batch, deep_to_uint8, load_image, resize_image, to_rgb
from onenip.deploy.runtimes import Runtime, is_exported, open_runtime
from onenip.errors import CheckpointError, ConfigError, DatasetError, OnenipWarning
from onenip.evaluation.calibration import check_far, far_threshold
from onenip.logs import progress_bar
from onenip.models.detector import Detector, resolve_device
from onenip.models.inference import DeployModel
from onenip.models.scoring import decide

ImageInput = Union[str, Path, Image.Image, np.ndarray]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    source: str  # the path, or "<image i>" for in-memory images
    score: float  # raw score: maximum of the 16x16 average-pooled anomaly map
    normalized: float  # 1 - 2^(-score / threshold): 0.5 at the threshold
    anomalous: bool  # score > threshold
    category: str  # category of the retrieved prompt (whose threshold decided)
    similarity: float  # cosine similarity to that prompt
    threshold: float
    anomaly_map: np.ndarray  # (H, W) float32 at the image's size
    mask: np.ndarray  # (H, W) bool: map > threshold where the image is judged defective
    known: bool = True  # False: the image matches no product type the model knows, and is not judged
    type_distance: float = float("nan")  # its distance to the prompts of `category` (the check's measure)
    colour_distance: float = float("nan")  # its colour's distance to the colours of `category` (the check's other one)

    @property
    def decision(self) -> str:
        """"defective", "good", or "unknown" (a product type the model does not know: not judged)."""
        return "unknown" if not self.known else "defective" if self.anomalous else "good"

    def __repr__(self) -> str:  # the arrays by their shape
        return (f"Prediction(source={self.source!r}, decision={self.decision!r}, normalized={self.normalized:.4f}, "
                f"score={self.score:.6g}, threshold={self.threshold:.6g}, category={self.category!r}, "
                f"similarity={self.similarity:.4f}, anomaly_map=<{self.anomaly_map.shape[0]}x"
                f"{self.anomaly_map.shape[1]}>, mask=<{int(self.mask.sum())} defect pixels>)")

    def row(self) -> dict[str, Any]:
        return {"image": self.source, "decision": self.decision, "anomalous": self.anomalous,
                "normalized_score": round(self.normalized, 6), "score": round(self.score, 6),
                "threshold": round(self.threshold, 6), "category": self.category, "known": self.known,
                "similarity": round(self.similarity, 6), "type_distance": round(self.type_distance, 6),
                "colour_distance": round(self.colour_distance, 6), "defect_pixels": int(self.mask.sum())}


@dataclass(frozen=True)
class PreparedImage:
    """An image read and resized for the model (`Predictor.prepare`), ready to be judged (`Predictor.judge`).
    Preparing can run in other threads than judging: the server prepares each request's image while the model judges
    the batch before."""
    source: str  # the path, or "<image i>" for in-memory images
    image: Image.Image  # 8-bit RGB at its own size: the anomaly map and mask come back at this size
    pixels: np.ndarray  # uint8 (S, S, 3): the model's input, resized by `resize_image`
    given: int | None = None  # the image's product type when given (an index of the model's categories), else None


def _as_rgb(item: ImageInput) -> Image.Image:
    if isinstance(item, (str, Path)):
        return load_image(item)
    if isinstance(item, Image.Image):  # decoded images (load_image's) are RGB already: no copy
        return item if item.mode == "RGB" else to_rgb(item)
    if isinstance(item, np.ndarray):
        arr = item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item
        if not (arr.ndim == 3 and arr.shape[2] in (3, 4) or arr.ndim == 2) or arr.size == 0:
            raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) and not empty, got "
                             f"shape {item.shape}")
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:  # scaled as deep image files are (see images.load_image)
            if arr.dtype.kind not in "uif":
                raise TypeError(f"an image array must hold numbers, got dtype {arr.dtype}")
            mode = "F" if arr.dtype.kind == "f" else "I;16" if arr.dtype == np.uint16 else "I"
            arr = deep_to_uint8(arr, mode)
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr[..., :3] if arr.ndim == 3 else arr)))
    raise TypeError(f"cannot read an image from {type(item).__name__} (give a path, a PIL image or a numpy array)")


def _runtime_device(device: str) -> torch.device:
    if str(device).strip().lower() not in ("auto", "cpu"):
        raise ConfigError(f"--device {device}: an exported file runs on the CPU (use auto or cpu), or predict with the "
                          "model file (model.safetensors) on a GPU")
    return torch.device("cpu")


class ExportedModel:
    """An exported file's runtime in the place of `DeployModel` for `Predictor`: uint8 images (N, 3, S, S) -> the same
    dict of tensors (whatever outputs the file has; a file without known / type_distance / colour_distance reads as
    known, distances NaN). `thresholds` (a tensor, one per category) starts at the file's; set to others (`level`, `far`: see
    `thresholds_at`, `far` from the held-out normal scores the metadata carries), the decisions and normalised
    scores are made again from the raw scores, as DeployModel makes them."""

    def __init__(self, runtime: Runtime, level: float | None = None, far: float | None = None) -> None:
        self.runtime = runtime
        self.categories: list[str] = runtime.categories
        self.redecide = level is not None or far is not None  # another sensitivity than the file's: decide again
        thresholds = [runtime.thresholds[c] for c in self.categories]
        if self.redecide:
            thresholds = thresholds_at(runtime.thresholds, runtime.meta.get("normal_scores") or {}, self.categories,
                                       level, far)
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32)

    def __call__(self, images: torch.Tensor, category: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if category is not None:
            raise ConfigError("an exported file cannot be given the product type")
        out = {k: torch.from_numpy(np.asarray(v)) for k, v in self.runtime.run(images.cpu().numpy()).items()}
        n = len(images)
        out.setdefault("known", torch.ones(n, dtype=torch.bool))
        out.setdefault("type_distance", torch.full((n,), float("nan")))
        out.setdefault("colour_distance", torch.full((n,), float("nan")))
        if self.redecide:
            out["normalized"], out["anomalous"] = decide(out["score"], self.thresholds[out["category"]], out["known"])
        return out


class Predictor:
    """A trained model ready to judge new images (its checkpoint must hold a deployment: every `onenip fit` writes one)."""

    def __init__(self, detector: Detector | Runtime, device: str = "auto", batch_size: int = 16, fast: bool = False,
                 compile_mode: str | None = None, product_type: str | None = None, level: float | None = None,
                 far: float | None = None) -> None:
        """`fast`: bf16 channels-last backbone and bf16 transformer on a GPU (see `DeployModel.optimize`); with
        `compile_mode` also torch.compile (worth it for long runs: compiling takes a minute).

        `product_type`: every image is of this type (its prompt and threshold, no retrieval). Sensitivity without a
        recalibration file: `level` is the normalised score above which an image is defective (0.5, the default, is
        the calibrated threshold; 0.6 flags fewer images), `far` sets each type's threshold at this false-alarm rate
        on the held-out normal scores the model keeps (see `thresholds_at`)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(detector, Runtime):  # an exported file (see `load`): its runtime runs the batches
            self.device = _runtime_device(device)
            self.model = ExportedModel(detector, level, far)
            if fast or compile_mode:
                raise ConfigError(f"--fast and compile are options of a model file (model.safetensors); {detector.path} "
                                  f"runs as exported ({detector.name}, {detector.precision})")
            if product_type is not None:
                raise ConfigError(f"--type needs the model file (model.safetensors): an exported file ({detector.path}) "
                                  "always retrieves the product type itself")
            self.given_type = None
            self.batch_size = batch_size
            self.size = detector.size
            return
        if detector.deployment is None:
            raise CheckpointError("this model has no prompt pool and thresholds (a training checkpoint?); use the "
                                  "run's model.safetensors, or `onenip calibrate MODEL --output NEW.safetensors`")
        self.device = resolve_device(device, "--device")
        self.model = DeployModel(detector, detector.deployment).to(self.device)
        self.given_type: int | None = None
        if product_type is not None:
            if product_type not in self.model.categories:
                raise ConfigError(f"--type {product_type!r} is not one of the model's product types: "
                                  f"{', '.join(self.model.categories)}")
            self.given_type = self.model.categories.index(product_type)
        if level is not None or far is not None:
            self.model.thresholds.copy_(torch.tensor(thresholds_at(
                detector.deployment.thresholds, detector.deployment.normal_scores, self.model.categories, level,
                far), dtype=torch.float32, device=self.device))
        if fast or compile_mode:
            self.model.optimize(compile_mode)
        self.batch_size = batch_size
        self.size = detector.input_size

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", batch_size: int = 16, fast: bool = False,
             compile_mode: str | None = None, threads: int = 0, hint: str | None = None,
             **options: Any) -> "Predictor":
        """A model file (model.safetensors, a checkpoint or run folder) run by PyTorch, or an exported file run by
        its runtime, chosen by the suffix (`onenip.deploy.runtimes.open_runtime`): ``.onnx`` ONNX Runtime, ``.xml``
        OpenVINO (at the precision it was exported for), ``.torchscript.pt`` TorchScript. `threads`: the runtime's
        threads (0: its default; exported files only). `hint`: OpenVINO's performance hint for an .xml file (LATENCY,
        the default: one image as fast as it goes; THROUGHPUT: a batch split across OpenVINO's streams, more images
        per second; other runtimes ignore it). Other `options` go to `Predictor` (product_type, level, far, ...)."""
        if is_exported(checkpoint):
            return cls(open_runtime(checkpoint, threads=threads, hint=hint), device=device, batch_size=batch_size,
                       fast=fast, compile_mode=compile_mode, **options)
        if threads:
            raise ConfigError("threads applies to exported files (.onnx, .xml, .torchscript.pt); PyTorch's are set by "
                              "torch.set_num_threads")
        return cls(Detector.load(checkpoint), device=device, batch_size=batch_size, fast=fast, compile_mode=compile_mode,
                   **options)

    @property
    def categories(self) -> list[str]:
        return self.model.categories

    @torch.no_grad()
    def predict(self, inputs: ImageInput | Sequence[ImageInput], progress: bool = False) -> list[Prediction]:
        if isinstance(inputs, (bytes, bytearray)) or inputs is None:
            raise TypeError(f"cannot read an image from {type(inputs).__name__} (give a path, a PIL image or a numpy "
                            "array, or a list of them)")
        items = [inputs] if isinstance(inputs, (str, Path, Image.Image, np.ndarray)) else list(inputs)
        out: list[Prediction] = []
        for start in progress_bar(range(0, len(items), self.batch_size), desc="predict", unit="batch", disable=not progress):
            chunk = items[start : start + self.batch_size]
            out.extend(self.judge([self.prepare(x, start + k) for k, x in enumerate(chunk)]))
        return out

    __call__ = predict

    @property
    def accepts_type(self) -> bool:
        """Whether an image can be given its product type (`prepare`, `type_index`): a model file, not an exported one
        (which always retrieves the type)."""
        return not isinstance(self.model, ExportedModel)

    def type_index(self, name: str) -> int:
        """The index of product type `name` among the model's categories, to give an image its type (`prepare`).
        ConfigError for a name the model does not know, and for an exported file (`accepts_type`)."""
        if not self.accepts_type:
            raise ConfigError(f"an exported file ({self.model.runtime.path}) always retrieves the product type itself: "
                              "give the type with the model file (model.safetensors)")
        if name not in self.model.categories:
            raise ConfigError(f"{name!r} is not one of the model's product types: {', '.join(self.model.categories)}")
        return self.model.categories.index(name)

    def prepare(self, item: ImageInput, index: int = 0, product_type: str | None = None) -> PreparedImage:
        """`item` read (a path, a PIL image or a numpy array, as `predict` takes them) and resized to the model's input
        size; `index` names an in-memory image ("<image i>"); `product_type`: the image's type, judged as `--type`
        judges (its prompt and threshold, no retrieval; see `type_index`), else the predictor's own. Raises what
        `predict` raises for an unreadable image."""
        given = None if product_type is None else self.type_index(product_type)
        rgb = _as_rgb(item)
        source = str(item) if isinstance(item, (str, Path)) else f"<image {index}>"
        return PreparedImage(source=source, image=rgb, pixels=resize_image(rgb, self.size), given=given)

    @torch.no_grad()
    def judge(self, prepared: Sequence[PreparedImage]) -> list[Prediction]:
        """Prepared images (`prepare`) judged in order: what `predict` gives for the same images. One batch, or two
        when some images have a product type given and others not (the model takes a type for all or none)."""
        given = [self.given_type if p.given is None else p.given for p in prepared]
        out: list[Prediction | None] = [None] * len(prepared)
        for typed in (False, True):
            rows = [k for k, g in enumerate(given) if (g is not None) is typed]
            if not rows:
                continue
            batch = torch.from_numpy(as_batch([prepared[k].pixels for k in rows], self.size)).to(self.device)
            res = self.model(batch, torch.tensor([given[k] for k in rows], device=self.device) if typed else None)
            for i, k in enumerate(rows):
                out[k] = self._one(prepared[k], {name: v[i] for name, v in res.items()})
        return out  # type: ignore[return-value]  # every row filled

    def _one(self, prepared: PreparedImage, res: dict[str, torch.Tensor]) -> Prediction:
        w, h = prepared.image.size
        amap = F.interpolate(res["map"][None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        cat = int(res["category"])
        threshold = float(self.model.thresholds[cat])
        anomalous = bool(res["anomalous"])
        mask = (amap > threshold) if anomalous else torch.zeros_like(amap, dtype=torch.bool)
        return Prediction(
            source=prepared.source,
            score=float(res["score"]), normalized=float(res["normalized"]), anomalous=anomalous,
            category=self.model.categories[cat], similarity=float(res["similarity"]), threshold=threshold,
            anomaly_map=amap.cpu().numpy(), mask=mask.cpu().numpy(), known=bool(res["known"]),
            type_distance=float(res["type_distance"]), colour_distance=float(res["colour_distance"]),
        )


def thresholds_at(thresholds: Mapping[str, float], normal_scores: Mapping[str, Sequence[float] | None],
                  categories: Sequence[str], level: float | None = None, far: float | None = None) -> list[float]:
    """Each type's threshold for another sensitivity, without data, in the order of `categories`: from its calibrated
    threshold (`thresholds`, per type), at false-alarm rate `far` on the held-out normal scores the model keeps
    (`normal_scores`, per type: `Deployment.normal_scores` of a model, the ``normal_scores`` metadata of an exported file),
    and/or scaled so that the normalised score 1 - 2^(-score / threshold) crosses `level` where it crossed 0.5
    (threshold x -log2(1 - level))."""
    if level is not None and not 0 < level < 1:
        raise ConfigError(f"--threshold must be a normalised score between 0 and 1 (0.5: the calibrated threshold), got {level}")
    check_far(far)
    out = []
    for c in categories:
        t = thresholds[c]
        if far is not None:
            scores = normal_scores.get(c)
            if not scores:
                raise ConfigError(f"--far: the model keeps no held-out normal scores for {c} (a model trained before "
                                  "they were kept, or without held-out images): use `onenip calibrate MODEL --far` "
                                  "with its training data")
            t = far_threshold(np.asarray(scores), far)
        out.append(t * (-math.log2(1.0 - level)) if level is not None else t)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------------------

# A perceptually ordered colour ramp (dark blue -> blue -> cyan -> yellow -> red), interpolated linearly.
_RAMP = np.array([[0, 0, 64], [0, 64, 255], [0, 220, 220], [255, 230, 0], [220, 0, 0]], dtype=np.float32)


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB colours of the ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(x.astype(int), len(_RAMP) - 2)
    f = (x - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def overlay(image: Image.Image | np.ndarray, anomaly_map: np.ndarray, threshold: float, mask: np.ndarray | None = None,
            alpha: float = 0.5, caption: Prediction | None = None) -> np.ndarray:
    """The image with its anomaly map as a heat map (threshold in the middle of the ramp) and the mask outlined; with
    `caption`, a band below it with the decision, the normalised score, the product type and the colour legend (the
    ramp from 0 to twice the threshold, the threshold marked)."""
    rgb = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image, dtype=np.float32)
    colours = heat(anomaly_map / (2.0 * threshold)).astype(np.float32)
    out = rgb * (1 - alpha) + colours * alpha
    if mask is not None and mask.any():
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        out[edge] = (255, 255, 255)
    pic = out.clip(0, 255).astype(np.uint8)
    return pic if caption is None else _with_caption(pic, caption)


_DECISION_COLOURS = {"defective": (220, 0, 0), "good": (0, 150, 60), "unknown": (120, 120, 120)}


def _with_caption(pic: np.ndarray, pred: Prediction) -> np.ndarray:
    """`pic` above a band: the decision on its colour with the normalised score and the product type, then the heat
    ramp as a legend (0 at the left, the threshold at the black mark, twice it at the right)."""
    from PIL import ImageDraw

    w = pic.shape[1]
    band = Image.new("RGB", (w, CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    draw.rectangle((0, 0, w - 1, 17), fill=_DECISION_COLOURS[pred.decision])
    kind = pred.category if pred.known else f"not {pred.category}?"
    draw.text((4, 3), f"{pred.decision.upper()}  {pred.normalized:.2f}  {kind}", fill=(255, 255, 255))
    ramp = heat(np.linspace(0.0, 1.0, max(w - 8, 2)))
    band.paste(Image.fromarray(np.repeat(ramp[None], 8, axis=0)), (4, 21))
    mid = 4 + (w - 8) // 2
    draw.line((mid, 19, mid, 30), fill=(0, 0, 0))
    draw.text((4, 31), "0", fill=(0, 0, 0))
    draw.text((mid - 8, 31), "thr", fill=(0, 0, 0))
    return np.concatenate([pic, np.asarray(band)], axis=0)


CAPTION_HEIGHT = 44  # pixels added below an overlay by its caption


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders searched recursively for images, anything else as a glob pattern. Sorted per argument."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
            found = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            warn_unsupported(f"folder {path}", [str(f.relative_to(path)) for f in files if f.suffix.lower() not in
                                                IMAGE_EXTENSIONS and f.parent.name not in IMAGE_FOLDERS
                                                and f.name not in INDEX_FILES])
            if not found:
                raise DatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}")
            out.extend(found)
        else:
            found = sorted(Path(f) for f in glob.glob(p, recursive=True) if Path(f).is_file())
            if not found:
                raise DatasetError(f"{p}: no such file or folder, and no file matches it as a pattern")
            out.extend(found)
    return out


def _output_names(paths: list[Path]) -> list[str]:
    """Output file names, by one rule for all images: the last k parts of each path (without the suffix) joined by
    "__", with the smallest k that tells apart all the images that their whole paths tell apart: k = 1 (the file
    stems) unless stems repeat, and then e.g. good__000 and crack__000 for every image of the run alike. A name still
    shared (the same file given twice, a.png beside a.jpg) gets -2, -3, ... in input order: no output overwrites
    another."""
    parts = [p.relative_to(p.anchor).with_suffix("").parts for p in (Path(os.path.abspath(q)) for q in paths)]
    distinct = len(set(parts))  # what the whole paths tell apart
    names: list[str] = []
    for k in range(1, max((len(pp) for pp in parts), default=1) + 1):
        names = ["__".join(pp[-k:]) for pp in parts]
        if len(set(names)) == distinct:
            break
    used: set[str] = set()
    for i, name in enumerate(names):
        n = 1
        while names[i] in used:
            n += 1
            names[i] = f"{name}-{n}"
        used.add(names[i])
    return names


IMAGE_FOLDERS = ("overlays", "masks")  # what `onenip predict` writes into its output folder, beside the index
INDEX_FILES = ("predictions.csv", "predictions.json")


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies in the overlays/ or masks/ of `folder` or of another folder holding a predictions index
    (what `onenip predict` writes)."""
    out = folder.resolve()
    for parent in path.resolve().parents:
        if parent.name in IMAGE_FOLDERS and (parent.parent == out or any(
                (parent.parent / index).is_file() for index in INDEX_FILES)):
            return True
    return False


def _retire_earlier_run(out: Path) -> None:
    """Remove an earlier run's index from `out` and the overlays and masks it lists (only files inside `out`'s
    overlays/ and masks/: an edited index cannot reach elsewhere). Files no index lists are left alone."""
    if not any((out / index).exists() for index in INDEX_FILES):
        return
    try:
        listed = json.loads((out / "predictions.json").read_text())["predictions"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    for index in INDEX_FILES:  # first: no index may list a file already gone
        (out / index).unlink(missing_ok=True)
    (out / "report.html").unlink(missing_ok=True)  # a report of that run (`onenip report`) would show it
    folders = {(out / sub).resolve() for sub in IMAGE_FOLDERS}
    removed = 0
    for row in listed if isinstance(listed, list) else []:
        for key in ("overlay", "mask"):
            rel = row.get(key) if isinstance(row, dict) else None
            if isinstance(rel, str) and rel:
                path = (out / rel).resolve()
                if path.parent in folders and path.suffix == ".png" and path.exists():
                    path.unlink()
                    removed += 1
    log.warning(f"{out} held an earlier predict run: removed its index ({', '.join(INDEX_FILES)}), its report and the "
                f"{removed} overlays and masks it listed")


def _unreadable(first: DatasetError, rest: Sequence[Path], threads: int = 4) -> DatasetError:
    """The error for a run without --skip-bad that met an unreadable image: it and every other unreadable one among
    `rest` (the images not yet read, checked now, so that one rerun can fix them all), up to MAX_LISTED_PROBLEMS."""

    def problem(path: Path) -> str | None:
        try:
            load_image(path)
        except DatasetError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onenip-predict-check") as pool:
        problems = [str(first)] + [q for q in pool.map(problem, rest) if q is not None]
    count = "1 image cannot" if len(problems) == 1 else f"{len(problems)} images cannot"
    return DatasetError(f"{count} be read:{listing(problems)}\n"
                        "fix or remove them, or give --skip-bad to leave them out (listed in predictions.json)")


def run_predict(checkpoint: str | Path, inputs: Sequence[str], output: str | Path, device: str = "auto",
                batch_size: int = 16, images: bool = True, skip_bad: bool = False, progress: bool = True,
                fast: bool = False, product_type: str | None = None, level: float | None = None,
                far: float | None = None) -> list[dict]:
    """Judge every image, write predictions.csv / predictions.json and (with `images`) overlays/ and masks/ PNGs.

    The two index files are written last (atomically): a folder without them holds no finished run. Once this run
    has judged its first image, it retires an earlier run in the folder (`_retire_earlier_run`), so that a run that
    stops half way (an error, a kill) never leaves an old index that lists overlays it has overwritten, and a run
    that ends leaves no overlays of images it did not judge."""
    out = check_output_folder(output, "--output")
    predictor = Predictor.load(checkpoint, device=device, batch_size=batch_size, fast=fast, hint="THROUGHPUT",
                               product_type=product_type, level=level, far=far)  # a folder: batches, so streams
    found = expand_inputs(inputs)
    paths = [p for p in found if not _inside(p, out)]  # never the overlays and masks of an earlier run here
    if found and not paths:
        raise DatasetError(f"every input image lies in the overlays/ or masks/ that onenip predict wrote (into {out} "
                           "or another folder holding a predictions index)")
    unique: dict[Path, Path] = {}
    for p in paths:  # an image given twice is judged once
        unique.setdefault(p.resolve(), p)
    paths = list(unique.values())
    names = _output_names(paths)
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    retired = False
    for start in progress_bar(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not progress):
        chunk, loaded = [], []
        for k, p in enumerate(paths[start : start + batch_size]):
            try:
                loaded.append(load_image(p))  # decoded once, for the model and for the overlay
                chunk.append(start + k)
            except DatasetError as exc:
                if not skip_bad:
                    raise _unreadable(exc, paths[start + k + 1 :]) from None
                bad.append({"image": str(p), "reason": str(exc)})
        for k, pred in zip(chunk, predictor.predict(loaded)):
            pred.source = str(paths[k])
            row = pred.row()
            if not retired:
                _retire_earlier_run(out)
                retired = True
            if images:
                (out / "overlays").mkdir(parents=True, exist_ok=True)
                (out / "masks").mkdir(parents=True, exist_ok=True)
                pic = overlay(loaded[chunk.index(k)], pred.anomaly_map, pred.threshold, pred.mask, caption=pred)
                Image.fromarray(pic).save(out / "overlays" / f"{names[k]}.png")
                Image.fromarray(pred.mask.astype(np.uint8) * 255).save(out / "masks" / f"{names[k]}_mask.png")
                row.update(overlay=f"overlays/{names[k]}.png", mask=f"masks/{names[k]}_mask.png")
            rows.append(row)
    if bad:
        warnings.warn(f"left out {len(bad)} unreadable images (listed in predictions.json)", OnenipWarning, stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": str(checkpoint), "images": len(rows), "anomalous": sum(r["anomalous"] for r in rows),
        "unknown": sum(not r["known"] for r in rows), "given_type": product_type, "level": level, "far": far,
        "by_category": {c: {"images": sum(r["category"] == c for r in rows),
                            "anomalous": sum(r["category"] == c and r["anomalous"] for r in rows)}
                        for c in predictor.categories},
        "skipped": bad,
    }
    atomic_write_csv(out / "predictions.csv", rows)
    atomic_write_text(out / "predictions.json", json.dumps({"summary": summary, "predictions": rows}, indent=2))
    return rows
