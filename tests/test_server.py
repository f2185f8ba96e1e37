"""`onenip serve`: real HTTP requests to a server started here on 127.0.0.1 (uvicorn in a thread, and the command in a
subprocess), its batching, bad requests, the watched folder, and the web page and API docs in headless Chromium."""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="onenip serve needs the serve extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="onenip serve needs the serve extra: pip install -e '.[serve]'")

from onenip.cli import main  # noqa: E402
from onenip.data import images as image_reader  # noqa: E402
from onenip.data.images import load_image  # noqa: E402
from onenip.deploy import server as server_module  # noqa: E402
from onenip.deploy.batching import Batcher  # noqa: E402
from onenip.deploy.predictor import Predictor  # noqa: E402
from onenip.deploy.server import (  # noqa: E402
    UploadError,
    bind,
    create_app,
    decode_upload,
    page_html,
)
from onenip.deploy.watch import RESULTS_CSV, FolderWatcher  # noqa: E402

MAX_BYTES = 400_000


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def predictor(model: Path) -> Predictor:
    return Predictor.load(model, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def test_images(gen_data: Path) -> list[Path]:
    """Good and defective test images of both product types."""
    return sorted((gen_data / "disc" / "test").rglob("*.png"))[:6] + sorted((gen_data / "weave" / "test").rglob("*.png"))[:6]


class Server:
    """uvicorn serving `app` in a thread on 127.0.0.1 (a free port)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()


@contextmanager
def serve_command(*args: str) -> Iterator[str]:
    """`onenip serve ARGS --port 0` run as a command in a subprocess (listening on 127.0.0.1, a free port): yields the URL
    it prints once it listens (its output is read all along, so it never blocks on a full pipe); then Ctrl+C (SIGINT),
    after which it must have ended cleanly (exit status 0)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from onenip.cli import main; sys.exit(main())", "serve",
                             *args, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        url, seen, deadline = None, [], time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            found = re.search(r"onenip serve: (http://127\.0\.0\.1:\d+)/", line)
            url = found.group(1) if found else None
        assert url is not None, "".join(seen)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


@pytest.fixture(scope="module")
def server(predictor: Predictor, model: Path) -> Iterator[Server]:
    app = create_app(predictor, batch_size=4, max_wait_ms=20, max_bytes=MAX_BYTES, model_path=model)
    with Server(app) as srv:
        yield srv


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            chunks: list[bytes] | None = None) -> tuple[int, Any]:
    """One HTTP request on a new connection: (status, the JSON answer, or the text when it is not JSON)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        if chunks is not None:
            conn.request(method, path, body=iter(chunks), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        data = res.read()
    finally:
        conn.close()
    try:
        return res.status, json.loads(data)
    except ValueError:
        return res.status, data.decode("utf-8", "replace")


def form(*files: tuple[str, str, bytes, str | None], fields: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of (field, file name, data, content type) files and plain fields."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for key, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, name, data, ctype in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{name}"\r\n'.encode())
        if ctype:
            out.write(f"Content-Type: {ctype}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_image(url: str, path: Path, query: str = "", raw: bool = False) -> tuple[int, Any]:
    if raw:
        return request(url, "POST", f"/predict{query}", path.read_bytes(), {"Content-Type": "image/png"})
    body, headers = form(("file", path.name, path.read_bytes(), "image/png"))
    return request(url, "POST", f"/predict{query}", body, headers)


def png(pic: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (pic if isinstance(pic, Image.Image) else Image.fromarray(pic)).save(buf, format="PNG")
    return buf.getvalue()


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two answers for one image: the same decision and type, scores equal up to float rounding of another batch."""
    for key in ("anomalous", "category", "decision", "known", "threshold", "width", "height"):
        assert a.get(key) == b.get(key), (key, a, b)
    for key in ("normalized_score", "score", "similarity"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)


# -- answers ---------------------------------------------------------------------------------------------------------


def test_predict_answers_as_the_predictor(server: Server, predictor: Predictor, test_images: list[Path]) -> None:
    path = next(p for p in test_images if p.parent.name != "good")
    status, ans = post_image(server.url, path, "?overlay=true&mask=true")
    assert status == 200, ans
    pred = predictor.predict([path])[0]
    expected = {k: v for k, v in pred.row().items() if k != "image"}
    assert ans["image"] == path.name and ans["anomalous"] is pred.anomalous and isinstance(ans["anomalous"], bool)
    for key in ("category", "threshold", "defect_pixels"):
        assert ans[key] == expected[key]
    for key in ("normalized_score", "score", "similarity"):
        assert ans[key] == pytest.approx(expected[key], rel=1e-4)
    assert set(expected) <= set(ans)  # every field of Prediction.row() passes through
    w, h = Image.open(path).size
    assert (ans["width"], ans["height"]) == (w, h)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(ans["mask"]))))
    assert mask.shape == (h, w) and int((mask > 0).sum()) == ans["defect_pixels"] == int(pred.mask.sum())
    pic = Image.open(io.BytesIO(base64.b64decode(ans["overlay"])))
    assert pic.format == "PNG" and pic.size[0] == w and pic.size[1] >= h
    # the raw body gives the same answer; without the query, no pictures
    status, raw = post_image(server.url, path, raw=True)
    assert status == 200 and "overlay" not in raw and "mask" not in raw and raw["image"] == "upload"
    same_answer(raw, ans)


@pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None, reason="openvino not installed")
def test_an_exported_openvino_file_is_served(model: Path, server: Server, test_images: list[Path], tmp_path: Path) -> None:
    """`onenip serve model.xml` (the command, as the README runs it): the OpenVINO export (fp32) answers as the PyTorch
    model's server does, and /model describes it."""
    from onenip.deploy.export import export_model

    xml = export_model(model, "openvino", tmp_path / "model.xml")
    with serve_command(str(xml), "--batch-size", "4", "--max-wait-ms", "20") as url:
        for path in test_images[:3] + test_images[-2:]:
            status, got = post_image(url, path)
            assert status == 200, got
            same_answer(got, post_image(server.url, path)[1])
        status, info = request(url, "GET", "/model")
        _, want = request(server.url, "GET", "/model")
        assert status == 200 and info["model"] == str(xml), info
        assert info["categories"] == want["categories"] and info["input_size"] == want["input_size"]
        assert info["thresholds"] == pytest.approx(want["thresholds"], rel=1e-6)


def test_batch_answers_in_order(server: Server, test_images: list[Path]) -> None:
    chosen = test_images[:3] + test_images[-3:]
    body, headers = form(*[("files", p.name, p.read_bytes(), "image/png") for p in chosen])
    status, answers = request(server.url, "POST", "/predict/batch?mask=true", body, headers)
    assert status == 200 and isinstance(answers, list) and [a["image"] for a in answers] == [p.name for p in chosen]
    assert all("mask" in a and "overlay" not in a for a in answers)
    for p, a in zip(chosen, answers):
        same_answer(a, post_image(server.url, p)[1])


def test_health_and_model(server: Server, model: Path, predictor: Predictor, gen_data: Path) -> None:
    before = request(server.url, "GET", "/health")[1]["judged"]
    assert post_image(server.url, sorted((gen_data / "disc" / "test").rglob("*.png"))[0])[0] == 200
    status, health = request(server.url, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["judged"] == before + 1  # the image is counted
    status, info = request(server.url, "GET", "/model")
    import torch

    from onenip.version import __version__

    assert status == 200
    assert info["categories"] == ["disc", "weave"] and info["input_size"] == 64
    assert info["model"] == str(model.absolute()) and info["onenip"] == __version__ and info["torch"] == torch.__version__
    assert info["thresholds"] == pytest.approx(dict(zip(predictor.categories, predictor.model.thresholds.tolist())))
    assert info["max_bytes"] == MAX_BYTES and info["batch_size"] == 4


# -- bad requests ----------------------------------------------------------------------------------------------------


def bad_requests(good: bytes) -> list[tuple[str, str, bytes | None, dict[str, str], int, str]]:
    """(what, path, body, headers, status, a word of the error)."""
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    out = [
        ("text body", "/predict", b"hello", {"Content-Type": "text/plain"}, 415, "text/plain is not accepted"),
        ("no content type", "/predict", good, {}, 415, "no Content-Type"),
        ("empty raw body", "/predict", b"", {"Content-Type": "image/png"}, 400, "empty"),
        ("not an image", "/predict", b"\x00garbage" * 100, {"Content-Type": "image/png"}, 400, "not an image"),
        ("truncated", "/predict", good[: len(good) // 2], {"Content-Type": "image/png"}, 400, "truncated"),
        ("GIF data", "/predict", gif.getvalue(), {"Content-Type": "image/png"}, 415, "GIF images are not accepted"),
        ("too large", "/predict", good + b"\0" * MAX_BYTES, {"Content-Type": "image/png"}, 413, "larger than the limit"),
        ("malformed form", "/predict", b"garbage", {"Content-Type": "multipart/form-data; boundary=zz"}, 400,
         "multipart form"),
        ("form without boundary", "/predict", b"garbage", {"Content-Type": "multipart/form-data"}, 400, "multipart form"),
        ("bad query", "/predict?overlay=maybe", good, {"Content-Type": "image/png"}, 400, "overlay"),
        ("unknown path", "/predict/../../etc/passwd", good, {"Content-Type": "image/png"}, 404, "Not Found"),
    ]
    for what, files, fields, status, word in [
        ("form without a file", [], {"file": "/etc/passwd"}, 400, "no file"),
        ("empty file", [("file", "/etc/passwd", b"", "image/png")], None, 400, "empty"),
        ("two files to /predict", [("file", "a.png", good, "image/png"), ("file", "b.png", good, "image/png")], None,
         400, "several files"),
        ("text part", [("file", "a.txt", b"hello", "text/plain")], None, 415, "text/plain is not accepted"),
        ("truncated part", [("file", "half.png", good[: len(good) // 2], "image/png")], None, 400, "half.png"),
    ]:
        body, headers = form(*files, fields=fields)
        out.append((what, "/predict", body, headers, status, word))
    tiny = png(np.zeros((4, 4, 3), np.uint8))
    body, headers = form(*[("files", f"{i}.png", tiny, "image/png") for i in range(65)])
    out.append(("too many files", "/predict/batch", body, headers, 400, "more than 64 files"))
    return out


def test_bad_requests_get_a_clear_4xx_and_the_server_goes_on(server: Server, test_images: list[Path]) -> None:
    good = png(Image.open(test_images[0]).resize((24, 24)))
    for what, path, body, headers, status, word in bad_requests(good):
        got, ans = request(server.url, "POST", path, body, headers)
        assert got == status, (what, got, ans)
        assert isinstance(ans, dict) and set(ans) == {"error"} and word in ans["error"], (what, ans)
    # a body sent in chunks, without Content-Length, is cut off at the limit too
    got, ans = request(server.url, "POST", "/predict", headers={"Content-Type": "image/png"},
                       chunks=[good] + [b"\0" * 10_000] * 45)
    assert got == 413 and "larger than the limit" in ans["error"], ans
    # wrong methods, and a GET of a file path, read nothing
    assert request(server.url, "GET", "/predict")[0] == 405
    assert request(server.url, "GET", "/static/../../../etc/passwd")[0] == 404
    assert request(server.url, "GET", "/docs-assets/../../../../../etc/passwd")[0] == 404
    assert request(server.url, "GET", "/docs-assets/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd")[0] == 404
    # still serving, and the same answers
    status, ans = post_image(server.url, test_images[0])
    assert status == 200 and request(server.url, "GET", "/health")[1]["status"] == "ok"


def test_the_pixel_limit_of_onenips_reader_applies(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_reader, "MAX_PIXELS", 40 * 40)
    status, ans = request(server.url, "POST", "/predict", png(np.zeros((50, 50, 3), np.uint8)), {"Content-Type": "image/png"})
    assert status == 413 and "image upload: 50x50 pixels is more than the limit of 1,600 pixels" in ans["error"]
    status, _ = request(server.url, "POST", "/predict", png(np.zeros((40, 40, 3), np.uint8)), {"Content-Type": "image/png"})
    assert status == 200


def test_uploads_are_decoded_in_memory_by_the_image_reader(test_images: list[Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was written to disk")

    monkeypatch.setattr(Path, "write_bytes", no_disk)
    data = test_images[0].read_bytes()
    got = decode_upload(data, "a.png")
    assert np.array_equal(np.asarray(got), np.asarray(load_image(test_images[0])))  # what the reader makes of the file
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    for upload, name, status, message in [
        (data[: len(data) // 2], "half.png", 400, "cannot read image half.png: image file is truncated"),
        (b"", "empty.png", 400, "cannot read image empty.png: cannot identify image file (the data is empty: 0 bytes)"),
        (gif.getvalue(), "a.gif", 415, "cannot read image a.gif: GIF images are not accepted here (accepted: PNG, JPEG"),
    ]:
        with pytest.raises(UploadError) as refused:
            decode_upload(upload, name)
        assert refused.value.status == status and message in refused.value.message, refused.value.message
    monkeypatch.setattr(image_reader, "MAX_PIXELS", 90 * 90)
    with pytest.raises(UploadError) as refused:
        decode_upload(data, "big.png")
    assert refused.value.status == 413 and refused.value.message.startswith("image big.png: 96x96 pixels is more than")


# -- batching --------------------------------------------------------------------------------------------------------


def test_concurrent_requests_get_the_sequential_answers(server: Server, test_images: list[Path]) -> None:
    sequential = [post_image(server.url, p, raw=i % 2 == 1) for i, p in enumerate(test_images)]
    assert all(s == 200 for s, _ in sequential)
    batcher = server.app.state.batcher
    before = (batcher.batches, batcher.images)
    barrier = threading.Barrier(8)

    def one(i: int) -> tuple[int, Any]:
        if i < 8:
            barrier.wait(30)
        return post_image(server.url, test_images[i], raw=i % 2 == 1)

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, range(len(test_images))))
    for (s1, a1), (s2, a2) in zip(sequential, concurrent):
        assert s1 == s2 == 200
        same_answer(a1, a2)
    batches, images = batcher.batches - before[0], batcher.images - before[1]
    assert images == len(test_images) and batches < images, (batches, images)  # some were judged together


class CountingPredictor:
    """Records the size of every batch; answers each image by its index."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay

    def judge(self, items: list[Any]) -> list[Any]:  # what Batcher's worker calls
        self.sizes.append(len(items))
        time.sleep(self.delay)
        return [f"judged {x}" for x in items]


def test_batcher_takes_up_to_batch_size_and_waits_at_most_max_wait() -> None:
    fake = CountingPredictor(delay=0.05)
    batcher = Batcher(fake, batch_size=4, max_wait_ms=50).start()  # type: ignore[arg-type]
    try:
        futures = [batcher.submit(i) for i in range(10)]  # type: ignore[arg-type]
        assert [f.result(10) for f in futures] == [f"judged {i}" for i in range(10)]
        assert fake.sizes == [4, 4, 2]
        start = time.monotonic()
        assert batcher.submit("alone").result(10) == "judged alone"  # type: ignore[arg-type]
        assert time.monotonic() - start < 1.0 and fake.sizes[-1] == 1
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(0)  # type: ignore[arg-type]

    class Failing(CountingPredictor):
        def judge(self, items: list[Any]) -> list[Any]:
            if "bad" in items:
                raise ValueError("model failed")
            return super().judge(items)

    batcher = Batcher(Failing(), batch_size=2, max_wait_ms=0).start()  # type: ignore[arg-type]
    try:
        with pytest.raises(ValueError, match="model failed"):
            batcher.submit("bad").result(10)  # type: ignore[arg-type]
        assert batcher.submit("next").result(10) == "judged next" and batcher.alive  # type: ignore[arg-type]
    finally:
        batcher.close()


# -- the watched folder ----------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_watcher_judges_each_new_image_once(predictor: Predictor, test_images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "line"
    folder.mkdir()
    watcher = FolderWatcher(folder, judge=predictor.predict, interval=0.01, give_up_s=0.3)
    shutil.copy(test_images[0], folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(test_images[1], folder / ".hidden.png")
    assert watcher.poll() == 0  # seen once: it might still be written
    assert watcher.poll() == 1
    rows = read_csv(folder / RESULTS_CSV)
    assert [r["image"] for r in rows] == ["a.png"] and rows[0]["error"] == ""
    expected = predictor.predict([test_images[0]])[0].row()
    assert rows[0]["anomalous"] == str(expected["anomalous"]) and rows[0]["category"] == expected["category"]
    assert float(rows[0]["normalized_score"]) == pytest.approx(expected["normalized_score"], rel=1e-4)
    assert watcher.poll() == 0 and watcher.poll() == 0  # never again

    # a file still being written: waits while it changes, is retried while it cannot be read, judged once complete
    data = test_images[2].read_bytes()
    (folder / "b.png").write_bytes(data[:100])
    assert watcher.poll() == 0
    with open(folder / "b.png", "ab") as f:
        f.write(data[100:300])
    assert watcher.poll() == 0  # changed since the last look
    assert watcher.poll() == 0  # unchanged, but cannot be read yet: tried again later
    with open(folder / "b.png", "ab") as f:
        f.write(data[300:])
    os.utime(folder / "b.png", ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert watcher.poll() == 0 and watcher.poll() == 1
    assert [r["image"] for r in read_csv(folder / RESULTS_CSV)] == ["a.png", "b.png"]

    # one that stays unreadable is listed once, with the reason
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    assert watcher.poll() == 0 and watcher.poll() == 0
    time.sleep(0.35)
    assert watcher.poll() == 1
    broken = read_csv(folder / RESULTS_CSV)[-1]
    assert broken["image"] == "broken.png" and broken["decision"] == "unreadable" and "broken.png" in broken["error"]

    # a new watcher (a restart) keeps the file and judges only what it does not list
    shutil.copy(test_images[3], folder / "c.png")
    again = FolderWatcher(folder, judge=predictor.predict, interval=0.01, give_up_s=0.3)
    assert again.poll() == 0 and again.poll() == 1
    assert [r["image"] for r in read_csv(folder / RESULTS_CSV)] == ["a.png", "b.png", "broken.png", "c.png"]
    header = (folder / RESULTS_CSV).read_text().splitlines()[0].split(",")
    assert header[:2] == ["image", "judged_at"] and "error" in header and "normalized_score" in header


def test_serve_command_with_a_watched_folder(model: Path, test_images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "line"
    folder.mkdir()
    shutil.copy(test_images[0], folder / "before.png")
    with serve_command(str(model), "--device", "cpu", "--batch-size", "2", "--watch", str(folder)) as url:
        with open(folder / "after.png", "wb") as f:  # written in two steps, a moment apart
            data = test_images[1].read_bytes()
            f.write(data[:200])
            f.flush()
            time.sleep(1.5)
            f.write(data[200:])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = read_csv(folder / RESULTS_CSV) if (folder / RESULTS_CSV).exists() else []
            if len(rows) >= 2:
                break
            time.sleep(0.2)
        assert sorted(r["image"] for r in rows) == ["after.png", "before.png"], rows
        assert all(r["error"] == "" and r["decision"] for r in rows)
        status, health = request(url, "GET", "/health")
        assert status == 200 and health["watch"]["listed"] == 2
        status, ans = post_image(url, test_images[2])
        assert status == 200 and "anomalous" in ans
    assert len(read_csv(folder / RESULTS_CSV)) == 2  # once stopped (cleanly, `serve_command` checks)


def test_serve_command_errors(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(model), "--watch", str(tmp_path / "missing")]) == 2
    assert "--watch" in capsys.readouterr().err
    assert main(["serve", str(model), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--max-wait-ms" in capsys.readouterr().out


# -- the page and the API documentation ------------------------------------------------------------------------------


def test_page_and_docs_need_no_external_file(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    page = page_html()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads an external file"
    assert not re.search(r"""(@import|url\()\s*["']?(https?:)?//""", page)
    monkeypatch.setattr(server_module, "page_html", lambda: "read again")  # the app read it once, when it was made
    status, served = request(server.url, "GET", "/")
    assert status == 200 and served == page
    status, html = request(server.url, "GET", "/docs")
    assert status == 200 and "docs-assets/" in html and not re.search(r"""(src|href)=["']?(https?:)?//""", html), html
    for asset in re.findall(r"""(?:src|href)=["']?(/docs-assets/[\w.-]+)""", html):
        assert request(server.url, "GET", asset)[0] == 200, asset
    status, spec = request(server.url, "GET", "/openapi.json")
    assert status == 200 and {"/predict", "/predict/batch", "/health", "/model"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/png" in body


class Browser:
    """Headless Chromium driven by the DevTools protocol over --remote-debugging-pipe (file descriptors 3 and 4: no
    port, no extra package). `events` collects every event of the page."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        script = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(["bash", "-c", script, "chromium", *args], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._id = 0
        self._answers: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        box = self._answers.get(msg["id"])
                    if box is not None:
                        box.put(msg)
                else:
                    self.events.append(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        with self._lock:
            self._id += 1
            ident, box = self._id, queue.Queue()
            self._answers[ident] = box
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        answer = box.get(timeout=timeout)
        assert "error" not in answer, (method, answer)
        return answer["result"]

    def page(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Network", "DOM"):
            page.send(f"{domain}.enable")
        page.send("Page.navigate", {"url": url})
        page.wait("document.readyState === 'complete'")
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        self.log.close()


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def eval(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in res, res
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.browser.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == self.session]


@pytest.mark.slow
def test_page_and_docs_in_headless_chromium(chromium: str, server: Server, test_images: list[Path], tmp_path: Path) -> None:
    browser = Browser(chromium, tmp_path / "profile")
    try:
        page = browser.page(server.url + "/")
        page.wait("document.getElementById('model').textContent.includes('disc')")
        # pick two images with the page's file input, as a person would
        doc = page.send("DOM.getDocument")["root"]["nodeId"]
        node = page.send("DOM.querySelector", {"nodeId": doc, "selector": "#files"})["nodeId"]
        good = next(p for p in test_images if p.parent.name == "good")
        picked = [good, next(p for p in test_images if p.parent.name != "good" and p.name != good.name)]
        page.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(p) for p in picked]})
        page.wait("document.querySelectorAll('.result').length === 2 && "
                  "[...document.querySelectorAll('.result .decision')].every(b => b.dataset.decision !== 'waiting')")
        shown = page.eval("[...document.querySelectorAll('.result')].map(r => ({name: r.querySelector('.name')"
                          ".textContent, decision: r.querySelector('.decision').textContent, text: r.textContent, "
                          "img: r.querySelector('img').src.slice(0, 22)}))")
        answers = {p.name: post_image(server.url, p)[1] for p in picked}
        assert sorted(s["name"] for s in shown) == sorted(answers)
        for s in shown:
            ans = answers[s["name"]]
            assert s["decision"] == ans["decision"] in ("good", "defective", "unknown"), (s, ans)
            assert f"{ans['normalized_score']:.3f}" in s["text"] and ans["category"] in s["text"]
            assert s["img"] == "data:image/png;base64,"  # the overlay replaced the picked image
        assert "2 judged" in page.eval("document.getElementById('summary').textContent")
        # a file the server refuses is shown as refused, with the server's reason
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not an image at all")
        page.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(bad)]})
        page.wait("document.querySelectorAll('.result').length === 3 && "
                  "document.querySelector('.result').dataset.decision === 'error'")
        assert "not an image" in page.eval("document.querySelector('.result .error').textContent")
        assert all(u.startswith(server.url) or u.startswith(("data:", "blob:")) for u in page.requested()), page.requested()

        docs = browser.page(server.url + "/docs")
        docs.wait("document.querySelectorAll('.opblock').length >= 4")
        time.sleep(0.5)
        urls = docs.requested()
        assert any(u.endswith("/openapi.json") for u in urls), urls
        assert all(u.startswith(server.url) or u.startswith(("data:", "blob:")) for u in urls), urls
    finally:
        browser.close()
