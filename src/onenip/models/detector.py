"""The detector: frozen feature extractor + reconstruction network + configuration, built from a config or a checkpoint."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from onenip.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from onenip.config import Config
from onenip.errors import CheckpointError, ConfigError
from onenip.models.backbone import FeatureExtractor
from onenip.models.deployment import Deployment
from onenip.models.networks import ReconstructionNet, build_network
from onenip.models.scoring import Maps, anomaly_maps


def set_threads(threads: int) -> None:
    """PyTorch's CPU threads (train.threads; 0 keeps PyTorch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N) means here; `option` names where it came from, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name!r} but CUDA is not available on this machine (use auto or cpu)")
    return torch.device(name)


class Detector(nn.Module):
    """Images -> features -> reconstruction -> anomaly maps. `extractor` is frozen; `net` is what training learns."""

    def __init__(self, cfg: Config, extractor: FeatureExtractor, net: ReconstructionNet) -> None:
        super().__init__()
        self.cfg = cfg
        self.extractor = extractor
        self.net = net
        self.extra: dict = {}  # free-form metadata saved in the checkpoint's JSON (kept through load and save)
        self.deployment: Deployment | None = None  # a Deployment once the model is ready to judge new images

    @classmethod
    def build(cls, cfg: Config) -> "Detector":
        """A new detector: backbone weights as cfg.backbone says (an error if they cannot be loaded), fresh network.
        cfg.backbone.padding is set to what 'auto' resolved to, so that a saved model is rebuilt the same way."""
        extractor = FeatureExtractor(cfg.backbone)
        cfg.backbone.padding = extractor.padding
        net = build_network(cfg.model, extractor.out_channels, cfg.data.input_size)
        return cls(cfg, extractor, net)

    @classmethod
    def from_state(cls, state: CheckpointState, source: str = "checkpoint") -> "Detector":
        cfg = state.config
        if not state.backbone:
            raise CheckpointError(f"{source} holds no backbone weights")
        offline = copy.deepcopy(cfg.backbone)
        offline.weights = "random"  # the checkpoint's own backbone tensors are loaded strictly just below
        extractor = FeatureExtractor(offline)
        extractor.load_backbone_state(state.backbone, source=source)
        extractor.weights_source = cfg.backbone.weights
        net = build_network(cfg.model, extractor.out_channels, cfg.data.input_size)
        try:
            net.load_state_dict(state.net, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: network weights do not fit its configuration: {exc}") from None
        det = cls(cfg, extractor, net)
        det.extra = dict(state.extra)
        if "deployment" in det.extra and state.deploy:
            det.deployment = Deployment.from_state(state.deploy, det.extra.pop("deployment"))
        return det

    @classmethod
    def load(cls, path: str | Path) -> "Detector":
        return cls.from_state(load_checkpoint(path, with_training_state=False), source=str(path))

    @property
    def uses_prompt(self) -> bool:
        return self.net.uses_prompt

    @property
    def input_size(self) -> int:
        return self.cfg.data.input_size

    def features(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) uint8 -> (N, C, S/16, S/16) float32."""
        return self.extractor(images)

    def features_and_patches(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, S, S) uint8 -> the features (N, C, S/16, S/16) and the prompt map's patches (N, C', S/8, S/8)
        (`FeatureExtractor.patches`), from one backbone pass."""
        taps = self.extractor.taps(images)
        return self.extractor.combine(taps), self.extractor.patches(taps)

    def maps(self, feats: Tensor, prompt_feats: Tensor | None) -> Maps:
        """Features (B, C, H, W) and one prompt's features (B, C, H, W; ignored without prompts) -> the anomaly maps
        (`onenip.models.scoring.anomaly_maps`, as the deployed model computes them)."""
        rec = self.net.reconstruct(feats, prompt_feats if self.uses_prompt else None)
        return anomaly_maps(self.net, feats, rec, self.input_size)

    def checkpoint_state(self, **training: Any) -> CheckpointState:
        """Everything to save: network, backbone, deployment (if any), plus the given training fields."""
        extra, deploy = dict(self.extra), {}
        if self.deployment is not None:
            deploy, extra["deployment"] = self.deployment.to_state()
        return CheckpointState(config=self.cfg, net=self.net.state_dict(), backbone=self.extractor.body.state_dict(),
                               extra=extra, deploy=deploy, **training)

    def save(self, path: str | Path) -> Path:
        """Write the model (weights, configuration, deployment) without training state."""
        return save_checkpoint(path, self.checkpoint_state())
