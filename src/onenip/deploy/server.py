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

Requests that arrive together are judged together, in batches (`onenip.deploy.batching.Batcher`); what an answer
holds is built by `onenip.deploy.answers`.

What a request can do is bounded: the body is at most `max_bytes` (413 beyond), only PNG, JPEG, BMP and TIFF data are
decoded (415 for another Content-Type or format), in memory by onenip's own reader with its pixel limit
(`onenip.data.images.load_image`, `MAX_PIXELS`; 413 beyond); no upload is written to disk, and no parameter names a
file. A bad request gets a 4xx answer `{"error": "..."}` naming the problem, and the server goes on serving.

`watch`: every new image in a folder is judged and its result appended to FOLDER/onenip-results.csv
(`onenip.deploy.watch.FolderWatcher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from email.message import Message
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from onenip.data.images import TooManyPixelsError, UnacceptedFormatError, load_image
from onenip.deploy.answers import answer, model_info
from onenip.deploy.batching import Batcher
from onenip.deploy.predictor import Predictor
from onenip.deploy.watch import FolderWatcher
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

TYPE_HELP = ("the product type of the image(s), one of GET /model's categories: its prompt and threshold, no retrieval "
             "(as `onenip predict --type`); a model file only, not an exported one")


class UploadError(Exception):
    """A request the server refuses: an HTTP status (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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

    def given_type(name: str | None) -> str | None:
        """The `type` query checked before any image is read: 400 naming it when the model cannot take it."""
        if name is not None:
            try:
                predictor.type_index(name)
            except ConfigError as exc:
                raise UploadError(400, f"type={name}: {exc}") from None
        return name

    async def judge(items: list[tuple[str, bytes]], with_overlay: bool, with_mask: bool,
                    product_type: str | None = None) -> list[dict[str, Any]]:
        prepared = [await run_in_threadpool(lambda d=data, n=name: predictor.prepare(decode_upload(d, n),
                                                                                     product_type=product_type))
                    for name, data in items]  # decoded and resized here, beside the model's work on the batch before
        try:
            futures = [batcher.submit(p) for p in prepared]
        except RuntimeError as exc:
            raise UploadError(503, str(exc)) from None
        preds = [await asyncio.wrap_future(f) for f in futures]
        return await run_in_threadpool(lambda: [answer(p, name, im.image, with_overlay, with_mask)
                                                for p, (name, _), im in zip(preds, items, prepared)])

    @app.post("/predict", summary="Judge one image", openapi_extra={"requestBody": _IMAGE_BODY}, responses=_ERRORS)
    async def predict(request: Request, overlay: bool = False, mask: bool = False,
                      product_type: str | None = Query(None, alias="type", description=TYPE_HELP)) -> JSONResponse:
        """One image, as a multipart form with one file (field `file`) or as the raw body with an image Content-Type.
        Answers the decision (`anomalous`), `normalized_score` (0.5 at the threshold), raw `score`, `threshold`,
        product type (`category`) and `similarity`, `defect_pixels`; with `overlay=true` / `mask=true` also the heat-map
        overlay and the defect mask as base64 PNGs; with `type=NAME` the image is judged as that product type."""
        name = given_type(product_type)
        items = await uploads(request, most=1)
        return JSONResponse((await judge(items, overlay, mask, name))[0])

    @app.post("/predict/batch", summary="Judge several images", openapi_extra={"requestBody": _BATCH_BODY},
              responses=_ERRORS)
    async def predict_batch(request: Request, overlay: bool = False, mask: bool = False,
                            product_type: str | None = Query(None, alias="type", description=TYPE_HELP)) -> JSONResponse:
        """Several images in one multipart form (any file fields, e.g. `files`; at most 64, the body at most
        --max-bytes): one answer per image, in order, as /predict gives. A bad image refuses the whole request, naming
        it. With `type=NAME` every image is judged as that product type."""
        name = given_type(product_type)
        return JSONResponse(await judge(await uploads(request, most=MAX_BATCH_FILES), overlay, mask, name))

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
          access_log: bool = False, product_type: str | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Load the model, listen on `host`:`port` and serve until interrupted. `product_type`: every image's type unless
    its request gives one (`Predictor`'s product_type). `ready(url)` is called once listening (port 0 takes a free
    port: the URL names it)."""
    import uvicorn

    if watch is not None and not Path(watch).is_dir():
        raise ConfigError(f"--watch {watch}: no such folder")
    predictor = Predictor.load(checkpoint, device=device, batch_size=batch_size, product_type=product_type)
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
