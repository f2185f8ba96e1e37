"""`onenip serve`: a trained model behind HTTP (FastAPI + uvicorn), a web page to try it, and a watched folder.

Endpoints (the interactive documentation, Swagger UI served from local files with no external request, is at
/docs; the OpenAPI description at /openapi.json):

    POST /predict          one image: a multipart form with one file (field `file`), or the raw image as the body
                           with an image Content-Type (image/png, image/jpeg, image/bmp, image/tiff). `?overlay=true`
                           and `?mask=true` add the heat-map overlay and the defect mask as base64 PNGs.
    POST /predict/batch    several images in one multipart form (any file fields, e.g. `files`): a list, in order.
    GET  /health           whether the server judges images, and how many it has judged.
    GET  /model            product types, input size, thresholds, the model file, the onenip and torch versions.
    GET  /                 a web page: drop or pick images, see each decision, score and overlay.

Requests that arrive together are judged together: every image goes into one queue, and one worker thread takes up
to `batch_size` images from it, waiting at most `max_wait_ms` after the first for more (`Batcher`). Under several
concurrent clients the model then runs on batches, as `onenip predict` does: the images that arrived while it judged
the last batch. With the default wait of 0, reading and decoding the next requests overlaps with the model's work
(on 2 CPU cores this served more images/s than waiting 2 or 10 ms for full batches: docs/benchmarks.md).

What a request can do is bounded: the body is at most `max_bytes` (413 beyond), only PNG, JPEG, BMP and TIFF data are
decoded (415 for another Content-Type or format), in memory by onenip's own reader with its pixel limit
(`onenip.data.images.load_image`, `MAX_PIXELS`; 413 beyond); no upload is written to disk, and no parameter names a
file. A bad request gets a 4xx answer `{"error": "..."}` naming the problem, and the server goes on serving.

`watch`: every new image in a folder is judged and its result appended to FOLDER/onenip-results.csv (`FolderWatcher`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import csv
import io
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from onenip.data import IMAGE_EXTENSIONS
from onenip.data.images import TooManyPixelsError, UnacceptedFormatError, load_image
from onenip.deploy.predictor import Prediction, Predictor, overlay
from onenip.errors import ConfigError, DatasetError
from onenip.version import __version__

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
"""The image formats decoded (Pillow's names): those of onenip's datasets. Any other data is refused before decoding."""

ACCEPTED_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "application/octet-stream")
"""Content-Types accepted for a raw image body (and for a file part of a form; a part without one is accepted too)."""

MAX_BATCH_FILES = 64
"""Most images in one request to /predict/batch."""

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
RESULTS_CSV = "onenip-results.csv"


class UploadError(Exception):
    """A request the server refuses: an HTTP status (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------

_STOP = object()


class Batcher:
    """One worker thread that runs the predictor on batches of queued images.

    `submit(image)` returns a future of the image's `Prediction`. The worker takes the first queued image, then more
    until it holds `batch_size` or `max_wait_ms` have passed since the first (images already queued are taken at once),
    and judges them in one call of `predictor.predict`."""

    def __init__(self, predictor: Predictor, batch_size: int = 8, max_wait_ms: float = 0.0) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        if not 0 <= max_wait_ms <= 60_000:
            raise ConfigError(f"--max-wait-ms must be between 0 and 60000, got {max_wait_ms}")
        self.predictor = predictor
        self.batch_size = batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.batches = 0  # batches judged
        self.images = 0  # images judged
        self.failure: str | None = None  # the last error of the model, if its last batch failed
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="onenip-serve-batcher", daemon=True)
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, image: Image.Image) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.put((image, fut))
        return fut

    def predict(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Judge `images` through the queue (from any thread but the worker's): their predictions, in order."""
        return [f.result() for f in [self.submit(im) for im in images]]

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> tuple[list[tuple[Image.Image, concurrent.futures.Future]], bool]:
        """The next batch, and whether to stop after it."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.batch_size:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._take()
            live = [(im, fut) for im, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                preds = self.predictor.predict([im for im, _ in live])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request, the worker goes on
                log.exception("the model failed on a batch of %d images", len(live))
                self.failure = f"{type(exc).__name__}: {exc}"
                for _, fut in live:
                    fut.set_exception(exc)
                continue
            self.failure = None
            self.batches += 1
            self.images += len(live)
            for (_, fut), pred in zip(live, preds):
                fut.set_result(pred)
        while True:  # whatever was queued after the stop: refused
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[1].set_exception(RuntimeError("the server is shutting down"))


# --------------------------------------------------------------------------------------------------------------------
# Reading uploads
# --------------------------------------------------------------------------------------------------------------------


def decode_upload(data: bytes, name: str) -> Image.Image:
    """An uploaded image (its bytes, and the name errors give it: the form's file name, or "upload") -> 8-bit RGB, by
    onenip's image reader from memory (`load_image`: full decode, truncation and pixel-limit checks), with only
    `ACCEPTED_FORMATS` reaching a decoder. UploadError 413 for too many pixels, 415 for another format, 400 otherwise."""
    try:
        return load_image(data, name=name, formats=ACCEPTED_FORMATS)
    except TooManyPixelsError as exc:
        raise UploadError(413, str(exc)) from None
    except UnacceptedFormatError as exc:
        raise UploadError(415, str(exc)) from None
    except DatasetError as exc:
        raise UploadError(400, str(exc)) from None


def _media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """'multipart/form-data; boundary=x' -> ('multipart/form-data', {'boundary': 'x'})."""
    if not value:
        return "", {}
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): v for k, v in msg.get_params()[1:]} if msg.get_params() else {}
    return msg.get_content_type().lower(), params


# --------------------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A value as JSON takes it: numpy scalars as Python numbers, NaN and infinities as null, paths as text."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _png(pic: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pic).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _row(pred: Prediction) -> dict[str, Any]:
    """`Prediction.row()` with JSON-safe values (the answer's and the watched folder's CSV row's fields)."""
    return {k: _plain(v) for k, v in pred.row().items()}


def answer(pred: Prediction, name: str, image: Image.Image | None = None, with_overlay: bool = False,
           with_mask: bool = False) -> dict[str, Any]:
    """The JSON of one judged image: every field of `Prediction.row()` (the decision `anomalous`, `normalized_score`,
    `score`, `threshold`, `category`, `similarity`, `defect_pixels`, and whatever else the predictor reports), the
    image's name, width and height, and on request the overlay and the mask as base64 PNGs."""
    out = _row(pred)
    out["image"] = name
    out["width"], out["height"] = int(pred.anomaly_map.shape[1]), int(pred.anomaly_map.shape[0])
    if with_overlay and image is not None:
        out["overlay"] = _png(overlay(image, pred.anomaly_map, pred.threshold, pred.mask))
    if with_mask:
        out["mask"] = _png(pred.mask.astype(np.uint8) * 255)
    return out


def model_info(predictor: Predictor, model_path: str | Path | None = None) -> dict[str, Any]:
    """What GET /model answers: product types, input size, thresholds, device, the model file and versions."""
    import torch

    cats = list(predictor.categories)
    thresholds = {c: _plain(t) for c, t in zip(cats, predictor.model.thresholds.tolist())}
    return {"model": None if model_path is None else str(model_path), "categories": cats,
            "input_size": int(predictor.size), "thresholds": thresholds, "device": str(predictor.device),
            "onenip": __version__, "torch": torch.__version__}


# --------------------------------------------------------------------------------------------------------------------
# The watched folder
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Seen:
    stat: tuple[int, int]  # size, modification time (ns) at the last look
    since: float  # time.monotonic() when the file was first seen with this stat


@dataclass
class FolderWatcher:
    """Judges every new image in `folder` (not its subfolders) and appends one row per image to
    `folder`/onenip-results.csv: `image` (the file name), `judged_at` (UTC), the fields of `Prediction.row()`, and
    `error` (empty, or why the image could not be read).

    An image listed in the CSV is never judged again (also across restarts). An image is judged once its size and
    modification time are the same at two looks `interval` seconds apart (a file still being written waits); if it
    cannot be read (a writer that paused), it is tried again at every look, and once it has stayed unchanged and
    unreadable for `give_up_s` seconds it is listed with decision `unreadable` and the reason. Files whose names start
    with "." are left alone."""

    folder: Path
    judge: Callable[[list[Image.Image]], list[Prediction]]
    interval: float = 1.0
    give_up_s: float = 60.0
    columns: list[str] = field(default_factory=list)  # the CSV's columns when it is created
    _seen: dict[str, _Seen] = field(default_factory=dict, init=False)
    _done: set[str] = field(default_factory=set, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if not self.folder.is_dir():
            raise ConfigError(f"--watch {self.folder}: no such folder")
        self.csv = self.folder / RESULTS_CSV
        self._header: list[str] | None = None
        if self.csv.is_file() and self.csv.stat().st_size > 0:
            with open(self.csv, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self._header = list(reader.fieldnames or [])
                if "image" not in self._header:
                    raise ConfigError(f"{self.csv} has no 'image' column: not a results file of onenip serve (move it "
                                      "away, or watch another folder)")
                self._done = {row["image"] for row in reader if row.get("image")}

    @property
    def judged(self) -> int:
        return len(self._done)

    def start(self) -> "FolderWatcher":
        self._thread = threading.Thread(target=self._loop, name="onenip-serve-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a failed look (a folder gone for a moment): logged, and looked again
                log.exception("watching %s", self.folder)
            self._stop.wait(self.interval)

    def _candidates(self) -> dict[str, tuple[int, int]]:
        out = {}
        with os.scandir(self.folder) as entries:
            for e in entries:
                if e.name.startswith(".") or e.name in self._done or Path(e.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    if e.is_file():
                        st = e.stat()
                        out[e.name] = (st.st_size, st.st_mtime_ns)
                except OSError:  # removed meanwhile
                    continue
        return out

    def poll(self) -> int:
        """One look at the folder: judge the images that are new and complete. Returns how many rows were written."""
        found = self._candidates()
        ready: list[str] = []
        for name, stat in sorted(found.items()):
            seen = self._seen.get(name)
            if seen is None or seen.stat != stat:
                self._seen[name] = _Seen(stat, time.monotonic())  # new or still changing: look again next time
            elif stat[0] > 0:
                ready.append(name)
        for name in list(self._seen):
            if name not in found:
                del self._seen[name]
        images, names, rows = [], [], 0
        for name in ready:
            try:
                images.append(load_image(self.folder / name))
                names.append(name)
            except DatasetError as exc:
                if time.monotonic() - self._seen[name].since >= self.give_up_s:
                    self._write({"image": name, "decision": "unreadable", "error": str(exc)})
                    rows += 1
        if images:
            for name, pred in zip(names, self.judge(images)):
                row = _row(pred)
                row.update(image=name, error="")
                self._write(row)
                rows += 1
        return rows

    def _write(self, row: dict[str, Any]) -> None:
        row = {"image": row["image"], "judged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **row}
        new = self._header is None
        if new:
            keys = list(row) if not self.columns else ["image", "judged_at", *self.columns]
            self._header = list(dict.fromkeys([*keys, *row, "error"]))
        with open(self.csv, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self._header, restval="", extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        self._done.add(row["image"])
        self._seen.pop(row["image"], None)


# --------------------------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------------------------

_DOCS_ASSETS = "/docs-assets"
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'")
"""The web page's Content-Security-Policy: its own inline code, and requests to this server only."""


def _docs_folder() -> Path | None:
    """The Swagger UI files shipped by the `fastapi-offline` package, or None without it."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def page_html() -> str:
    """The web page at /: one self-contained HTML file (inline CSS and JavaScript)."""
    return (resources.files("onenip.deploy") / "static" / "index.html").read_text(encoding="utf-8")


_IMAGE_BODY = {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                                       "required": ["file"]}},
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in ACCEPTED_TYPES[:-1]},
}, "required": True}

_BATCH_BODY = {"content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    "required": ["files"]}}}, "required": True}

_ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"error": example}}}} for code, text,
           example in [(400, "empty, not an image, truncated, or a malformed form",
                        "cannot read image a.png: cannot identify image file (the data is empty: 0 bytes)"),
                       (413, "the body or the image is too large", "the request body is larger than 33554432 bytes"),
                       (415, "a Content-Type or an image format not accepted",
                        "cannot read image a.gif: GIF images are not accepted here (accepted: PNG, JPEG, BMP, TIFF)")]}


def create_app(predictor: Predictor, batch_size: int = 8, max_wait_ms: float = 0.0, max_bytes: int = DEFAULT_MAX_BYTES,
               watch: str | Path | None = None, model_path: str | Path | None = None, watch_interval: float = 1.0,
               on_start: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI application serving `predictor`. The batch worker (and the folder watcher) start with the app's
    lifespan (then `on_start()` is called) and stop with it."""
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes must be >= 1, got {max_bytes}")
    batcher = Batcher(predictor, batch_size, max_wait_ms)
    html = page_html()  # read once
    warm = predictor.predict([Image.new("RGB", (8, 8))])[0]  # a first run of the model (and the CSV's columns)
    watcher = None
    if watch is not None:
        watcher = FolderWatcher(Path(watch), judge=batcher.predict, interval=watch_interval,
                                columns=[k for k in warm.row() if k != "image"] + ["error"])
    info = model_info(predictor, model_path)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if watcher is not None:
            watcher.start()
        if on_start is not None:
            on_start()
        try:
            yield
        finally:
            if watcher is not None:
                await run_in_threadpool(watcher.stop)
            await run_in_threadpool(batcher.close)

    docs = _docs_folder()
    app = FastAPI(title="onenip", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Judge images with a trained OneNIP model: decision, score, product type, defect mask.")
    app.state.batcher, app.state.watcher = batcher, watcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()]
        return error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    async def body_of(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise UploadError(400, f"Content-Length {length!r} is not a number")
            if int(length) > max_bytes:
                raise UploadError(413, f"the request body ({int(length)} bytes) is larger than the limit of {max_bytes} "
                                       "bytes (onenip serve --max-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise UploadError(413, f"the request body is larger than the limit of {max_bytes} bytes "
                                       "(onenip serve --max-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def uploads(request: Request, most: int) -> list[tuple[str, bytes]]:
        """The images of a request: (name, bytes) of each file of a multipart form, or the raw body."""
        kind, _ = _media_type(request.headers.get("content-type"))
        accepted = f"multipart/form-data or a raw image body ({', '.join(ACCEPTED_TYPES[:-1])})"
        if not kind:
            raise UploadError(415, f"the request has no Content-Type: send {accepted}")
        if kind != "multipart/form-data" and kind not in ACCEPTED_TYPES:
            raise UploadError(415, f"Content-Type {kind} is not accepted: send {accepted}")
        body = await body_of(request)
        if kind != "multipart/form-data":
            if not body:
                raise UploadError(400, "the request body is empty: send an image")
            return [("upload", body)]
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=most + 1, max_fields=100,
                                                                max_part_size=1024 * 1024)
        except MultiPartException as exc:
            raise UploadError(400, f"the multipart form cannot be read: {exc.message}") from None
        except StarletteHTTPException as exc:
            raise UploadError(400, f"the multipart form cannot be read: {exc.detail}") from None
        except Exception as exc:  # noqa: BLE001 - a malformed form
            raise UploadError(400, f"the multipart form cannot be read: {exc or type(exc).__name__}") from None
        try:
            files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise UploadError(400, "the form holds no file: send the image in a file field named 'file'"
                                  + (" (or several in fields 'files')" if most > 1 else ""))
            if len(files) > most:
                raise UploadError(400, "the form holds several files: send one, or use /predict/batch" if most == 1 else
                                  f"the form holds more than {most} files: send at most {most} in one request")
            out = []
            for i, (key, up) in enumerate(files):
                name = up.filename or f"{key}[{i}]"
                ctype, _ = _media_type(up.content_type)
                if ctype and ctype not in ACCEPTED_TYPES:
                    raise UploadError(415, f"{name}: Content-Type {ctype} is not accepted: send an image "
                                           f"({', '.join(ACCEPTED_TYPES[:-1])})")
                out.append((name, await up.read()))
            return out
        finally:
            await form.close()

    async def judge(items: list[tuple[str, bytes]], with_overlay: bool, with_mask: bool) -> list[dict[str, Any]]:
        images = [await run_in_threadpool(decode_upload, data, name) for name, data in items]
        try:
            futures = [batcher.submit(im) for im in images]
        except RuntimeError as exc:
            raise UploadError(503, str(exc)) from None
        preds = [await asyncio.wrap_future(f) for f in futures]
        return await run_in_threadpool(
            lambda: [answer(p, name, im, with_overlay, with_mask) for p, (name, _), im in zip(preds, items, images)])

    @app.post("/predict", summary="Judge one image", openapi_extra={"requestBody": _IMAGE_BODY}, responses=_ERRORS)
    async def predict(request: Request, overlay: bool = False, mask: bool = False) -> JSONResponse:
        """One image, as a multipart form with one file (field `file`) or as the raw body with an image Content-Type.
        Answers the decision (`anomalous`), `normalized_score` (0.5 at the threshold), raw `score`, `threshold`,
        product type (`category`) and `similarity`, `defect_pixels`; with `overlay=true` / `mask=true` also the heat-map
        overlay and the defect mask as base64 PNGs."""
        items = await uploads(request, most=1)
        return JSONResponse((await judge(items, overlay, mask))[0])

    @app.post("/predict/batch", summary="Judge several images", openapi_extra={"requestBody": _BATCH_BODY},
              responses=_ERRORS)
    async def predict_batch(request: Request, overlay: bool = False, mask: bool = False) -> JSONResponse:
        """Several images in one multipart form (any file fields, e.g. `files`; at most 64, the body at most
        --max-bytes): one answer per image, in order, as /predict gives. A bad image refuses the whole request, naming
        it."""
        return JSONResponse(await judge(await uploads(request, most=MAX_BATCH_FILES), overlay, mask))

    @app.get("/health", summary="Whether the server judges images")
    async def health() -> JSONResponse:
        ok = batcher.alive
        body = {"status": "ok" if ok else "down", "judged": batcher.images, "batches": batcher.batches,
                "queued": batcher.pending, "uptime_s": round(time.time() - started, 1), "last_error": batcher.failure}
        if watcher is not None:
            body["watch"] = {"folder": str(watcher.folder), "listed": watcher.judged}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/model", summary="The model: product types, input size, thresholds, versions")
    async def model() -> JSONResponse:
        return JSONResponse({**info, "batch_size": batcher.batch_size, "max_wait_ms": batcher.max_wait * 1000.0,
                "max_bytes": max_bytes, "watch": None if watcher is None else str(watcher.folder)})

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY})

    if docs is not None:
        app.mount(_DOCS_ASSETS, StaticFiles(directory=docs), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def swagger() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="onenip API",
                                       swagger_js_url=f"{_DOCS_ASSETS}/swagger-ui-bundle.js",
                                       swagger_css_url=f"{_DOCS_ASSETS}/swagger-ui.css",
                                       swagger_favicon_url=f"{_DOCS_ASSETS}/favicon.png",
                                       swagger_ui_parameters={"validatorUrl": None})
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (port 0: a free port, see `sock.getsockname()`)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", batch_size: int = 8,
          max_wait_ms: float = 0.0, max_bytes: int = DEFAULT_MAX_BYTES, watch: str | Path | None = None,
          access_log: bool = False, ready: Callable[[str], None] | None = None) -> None:
    """Load the model, listen on `host`:`port` and serve until interrupted. `ready(url)` is called once listening
    (port 0 takes a free port: the URL names it)."""
    import uvicorn

    if watch is not None and not Path(watch).is_dir():
        raise ConfigError(f"--watch {watch}: no such folder")
    predictor = Predictor.load(checkpoint, device=device, batch_size=batch_size)
    sock = bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown}:{bound[1]}/"
    try:
        app = create_app(predictor, batch_size=batch_size, max_wait_ms=max_wait_ms, max_bytes=max_bytes, watch=watch,
                         model_path=Path(checkpoint).absolute(), on_start=None if ready is None else lambda: ready(url))
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=access_log, timeout_graceful_shutdown=10))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl+C: uvicorn has shut down gracefully, then raised the signal again
        log.info("onenip serve: stopped")
    finally:
        sock.close()
