"""OneNIP: unified (multi-class) anomaly detection with one normal image prompt (ECCV 2024).

    import onenip
    result = onenip.fit("configs/iad-mix-offline.yaml", evaluate=True)
    results = onenip.test(result.model_path, overrides=["eval.protocol=paper"])
"""

from .api import fit, make_config, test
from .config import Config, load_config
from .detector import Detector
from .errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ExportError,
    MissingDependencyError,
    OnenipError,
    WeightsError,
)
from .evaluate import Results, evaluate
from .predict import Prediction, Predictor

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "Config", "ConfigError", "DatasetError", "Detector", "ExportError", "MissingDependencyError",
    "OnenipError", "Prediction", "Predictor",
    "Results", "WeightsError",
    "__version__", "evaluate", "fit", "load_config", "make_config", "test",
]
