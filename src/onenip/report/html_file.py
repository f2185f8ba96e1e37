"""What the two HTML pages of `onenip report` (a test run's, `onenip.report.page`, and a predict run's,
`onenip.report.predictions`) are both made of: text read from files escaped for HTML, pictures inlined as PNG data
URIs, and the file the page is written to.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from onenip.checkpoint import check_output_file

__all__ = ["THUMBNAIL", "escape", "page_file", "png_uri", "thumbnail"]

THUMBNAIL = 256  # pixels on the long side of a picture in a page
PAGE_NAME = "report.html"


def escape(value: Any) -> str:
    """HTML-escape anything read from a file (quotes included, for attributes)."""
    return html.escape(str(value), quote=True)


def thumbnail(image: Image.Image) -> Image.Image:
    """An RGB copy of `image` shrunk (never enlarged, aspect ratio kept) to at most THUMBNAIL pixels on its long side."""
    small = image.convert("RGB")  # a copy, whatever the mode
    small.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    return small


def png_uri(picture: Image.Image) -> str:
    """`picture` as a PNG data URI, for an <img> of a page that opens without any other file."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def page_file(folder: Path, output: str | Path | None) -> Path:
    """The file a page of the run in `folder` goes to: `output`, or report.html inside it when it is a folder (default:
    `folder`). Raises ConfigError when that file must not be written (an onenip model or training checkpoint)."""
    out = Path(output) if output is not None else folder / PAGE_NAME
    if out.is_dir():
        out = out / PAGE_NAME
    return check_output_file(out, "output", models=True)
