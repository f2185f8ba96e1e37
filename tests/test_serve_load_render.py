"""benchmarks/serve_load.py's Markdown: which runtime served (an exported file's, or PyTorch's threads), isolated
requests when measured, and the server's memory after each half of the memory check."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _result(**changes: object) -> dict:
    res = {"input_size": 224, "tiny_model": False, "model": "W/model.xml", "batch_size": 8, "max_wait_ms": 0.0,
           "command": "python benchmarks/serve_load.py", "commit": "abc1234", "device": "CPU", "torch": "2.x",
           "threads": 1, "runtime": "openvino bf16", "load_average": 0.5, "images": 10,
           "levels": [{"clients": 8, "requests": 100, "images_per_s": 90.0, "offline_images_per_s": 100.0,
                       "ratio": 0.9, "p50_ms": 50.0, "p99_ms": 80.0}],
           "memory": {"requests": 10000, "clients": 8, "seconds": 70.0, "images_per_s": 142.9, "rss_before_mib": 1000.0,
                      "rss_middle_mib": 1010.0, "rss_after_mib": 1011.0, "peak_mib": 1012.0}}
    res.update(changes)
    return res


def test_serve_load_names_the_runtime_and_the_memory_after_each_half() -> None:
    serve_load = pytest.importorskip("serve_load")
    text = serve_load.render(_result())
    assert "openvino bf16 with its default threads (all cores) in the server and offline" in text
    assert "1000 MiB after the warm-up, 1010 MiB after 5,000 more, 1011 MiB after 10,000 more requests" in text
    assert "| 8 | 100 | 90.0 | 100.0 | 90 % | 50.0 | 80.0 |" in text
    assert "Isolated" not in text  # none measured
    alone = serve_load.render(_result(isolated={"rest_ms": 100.0, "requests": 120, "p50_ms": 11.25, "p99_ms": 14.0}))
    assert "one client resting 100 ms after each answer" in alone and "p50 11.2 ms, p99 14.0 ms over 120 requests" in alone
    older = _result(runtime=None, threads=2)  # a PyTorch model, and a result file written before the middle was kept
    del older["memory"]["rss_middle_mib"]
    text = serve_load.render(older)
    assert "2 torch threads in the server and offline" in text and "openvino" not in text
    assert "1000 MiB after the warm-up, 1011 MiB after 10,000 more requests" in text


def _encoded(fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 40)).save(buf, format=fmt, **options)
    return buf.getvalue()


def test_serve_load_sends_each_image_with_its_content_type() -> None:
    serve_load = pytest.importorskip("serve_load")
    assert serve_load.content_type(_encoded("PNG")) == "image/png"
    assert serve_load.content_type(_encoded("JPEG")) == "image/jpeg"
    assert serve_load.content_type(_encoded("BMP")) == "image/bmp"
    lzw = _encoded("TIFF", compression="tiff_lzw")
    assert serve_load.content_type(_encoded("TIFF")) == serve_load.content_type(lzw) == "image/tiff"
    assert serve_load.content_type(b"GIF89a") == "application/octet-stream"
