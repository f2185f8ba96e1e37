"""OneNIP: unified (multi-class) anomaly detection with one normal image prompt (ECCV 2024).

Section references "§N" in the docstrings point to the numbered sections of docs/method.md.

    import onenip
    result = onenip.fit("configs/iad-mix-offline.yaml", evaluate=True)
    results = onenip.test(result.model_path, overrides=["eval.protocol=paper"])
"""

from onenip.api import fit, make_config, test
from onenip.config import Config, load_config
from onenip.deploy.predictor import Prediction, Predictor
from onenip.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ExportError,
    MissingDependencyError,
    OnenipError,
    WeightsError,
)
from onenip.evaluation.evaluate import Results, evaluate
from onenip.models.detector import Detector
from onenip.version import __version__

__all__ = [
    "CheckpointError", "Config", "ConfigError", "DatasetError", "Detector", "ExportError", "MissingDependencyError",
    "OnenipError", "Prediction", "Predictor",
    "Results", "WeightsError",
    "__version__", "evaluate", "fit", "load_config", "make_config", "test",
]
