"""`Batcher`: the server's one model thread, judging queued images in batches as they arrive.

Requests that arrive together are judged together: every image, read and resized by the request's own thread
(`Predictor.prepare`), goes into one queue, and one worker thread takes up to `batch_size` images from it, waiting at
most `max_wait_ms` after the first for more, and runs the model on them (`Predictor.judge`). Under several concurrent
clients the model then runs on batches, as `onenip predict` does: the images that arrived while it judged the last
batch. With the default wait of 0, reading, decoding and resizing the next requests overlaps with the model's work (on 2 CPU
cores this served more images/s than waiting 2 or 10 ms for full batches: docs/benchmarks.md).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Sequence

from PIL import Image

from onenip.deploy.predictor import Prediction, Predictor, PreparedImage
from onenip.errors import ConfigError

log = logging.getLogger(__name__)

_STOP = object()


class Batcher:
    """One worker thread that runs the predictor on batches of queued images.

    `submit(prepared)` returns a future of the image's `Prediction` (`prepared`: `predictor.prepare(image)`, made in
    the caller's thread). The worker takes the first queued image, then more until it holds `batch_size` or
    `max_wait_ms` have passed since the first (images already queued are taken at once), and judges them in one call
    of `predictor.judge`."""

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

    def submit(self, prepared: PreparedImage) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.put((prepared, fut))
        return fut

    def predict(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Judge `images` through the queue (from any thread but the worker's; each prepared in the caller's thread):
        their predictions, in order."""
        return [f.result() for f in [self.submit(self.predictor.prepare(im, k)) for k, im in enumerate(images)]]

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> tuple[list[tuple[PreparedImage, concurrent.futures.Future]], bool]:
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
                preds = self.predictor.judge([im for im, _ in live])
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
