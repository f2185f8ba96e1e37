"""`onenip serve --watch FOLDER`: every new image in a folder judged once, its result appended to a CSV beside it."""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from onenip.data import IMAGE_EXTENSIONS
from onenip.data.images import load_image
from onenip.deploy.answers import json_row
from onenip.deploy.predictor import Prediction
from onenip.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

RESULTS_CSV = "onenip-results.csv"
"""The watched folder's results file."""


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
                row = json_row(pred)
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
