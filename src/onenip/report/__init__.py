"""`onenip report`: one self-contained HTML page from a test run, with SVG charts."""

from onenip.report.page import make_report

__all__ = ["make_report"]
