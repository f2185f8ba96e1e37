"""What the server answers for a judged image and for GET /model, as JSON-safe values (the watched folder's CSV rows
use the same fields)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onenip.deploy.predictor import Prediction, Predictor, overlay
from onenip.version import __version__


def plain(value: Any) -> Any:
    """A value as JSON takes it: numpy scalars as Python numbers, NaN and infinities as null, paths as text."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def png_base64(pic: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pic).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def json_row(pred: Prediction) -> dict[str, Any]:
    """`Prediction.row()` with JSON-safe values (the answer's and the watched folder's CSV row's fields)."""
    return {k: plain(v) for k, v in pred.row().items()}


def answer(pred: Prediction, name: str, image: Image.Image | None = None, with_overlay: bool = False,
           with_mask: bool = False) -> dict[str, Any]:
    """The JSON of one judged image: every field of `Prediction.row()` (the decision `anomalous`, `normalized_score`,
    `score`, `threshold`, `category`, `similarity`, `defect_pixels`, and whatever else the predictor reports), the
    image's name, width and height, and on request the overlay and the mask as base64 PNGs."""
    out = json_row(pred)
    out["image"] = name
    out["width"], out["height"] = int(pred.anomaly_map.shape[1]), int(pred.anomaly_map.shape[0])
    if with_overlay and image is not None:
        out["overlay"] = png_base64(overlay(image, pred.anomaly_map, pred.threshold, pred.mask))
    if with_mask:
        out["mask"] = png_base64(pred.mask.astype(np.uint8) * 255)
    return out


def model_info(predictor: Predictor, model_path: str | Path | None = None) -> dict[str, Any]:
    """What GET /model answers: product types, input size, thresholds, whether a request can give the product type
    (`accepts_type`: a model file can, an exported file cannot) and the type given to every image (`default_type`:
    `serve --type`, else None), device, the model file and versions."""
    import torch

    cats = list(predictor.categories)
    thresholds = {c: plain(t) for c, t in zip(cats, predictor.model.thresholds.tolist())}
    return {"model": None if model_path is None else str(model_path), "categories": cats,
            "input_size": int(predictor.size), "thresholds": thresholds,
            "accepts_type": predictor.accepts_type,
            "default_type": None if predictor.given_type is None else cats[predictor.given_type],
            "device": str(predictor.device),
            "onenip": __version__, "torch": torch.__version__}
