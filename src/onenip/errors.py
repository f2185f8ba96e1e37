"""Exceptions raised by onenip. Every one names the file or option at fault."""

from __future__ import annotations


class OnenipError(Exception):
    """Base class of every error onenip raises on purpose."""


class ConfigError(OnenipError, ValueError):
    """A configuration key is unknown, has the wrong type or an impossible value."""


class DatasetError(OnenipError, ValueError):
    """A dataset folder, metadata file, image or mask cannot be used."""


class WeightsError(OnenipError, RuntimeError):
    """Backbone weights cannot be found or loaded."""


class CheckpointError(OnenipError, RuntimeError):
    """A checkpoint is missing, corrupted or incompatible."""


class ExportError(OnenipError, RuntimeError):
    """The model could not be exported, or the exported file does not compute what PyTorch computes."""


class MissingDependencyError(OnenipError, ImportError):
    """An optional package (onnx, onnxruntime) is needed but not installed."""


class OnenipWarning(UserWarning):
    """A warning onenip gives on purpose (the CLI prints it as one `onenip: warning: ...` line)."""
