"""Checkpoints: one safetensors file holding every tensor, its JSON metadata holding the configuration and state.

Layout of the tensors: ``net.*`` the reconstruction network (with the refiner), ``backbone.*`` the frozen backbone's
tapped layers (so a checkpoint is self-contained and loads offline), ``deploy.*`` the prompt pool of a finished model
and the patches of the types added to it (its thresholds and fusion constant are in the metadata), and for resuming
``optim.<i>.<name>`` (AdamW moments) and ``rng.*`` (random-generator states). The metadata key ``onenip`` holds JSON:
format, version, the configuration, epoch, step, optimizer hyper-parameters and the training history. Nothing is
pickled, so loading a checkpoint cannot execute code. Files are written to a temporary name, flushed and renamed: a
checkpoint on disk is always complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from onenip.config import Config, config_from_dict
from onenip.errors import CheckpointError, ConfigError

FORMAT = "onenip-checkpoint"
VERSION = 3  # the newest layout this onenip reads and writes; a file is written with the oldest that holds it
# 1: everything but what 2 adds; 2: an added type's prompt patches stored as a bank of rows (M, C') (earlier onenip
# stored them as (K, C', G, G) and cannot read the bank: such a file says 2, so that it refuses it by name);
# 3: prompt-map fusion on trained types (eval.prompt_fusion > 0: banks of trained types and their weights, which an
# earlier onenip would ignore, judging the learned map alone by thresholds set on the fused one)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts as CSV; the columns are every key, in order of first appearance."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@dataclass
class CheckpointState:
    """What a checkpoint holds, as plain objects."""

    config: Config
    net: dict[str, Tensor]
    backbone: dict[str, Tensor]
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    optimizer: dict[str, Any] | None = None  # torch optimizer state_dict
    rng: dict[str, Tensor] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, Tensor] = field(default_factory=dict)  # tensors of the deployment (prompt pool features)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _layout_version(deploy: dict[str, Tensor], extra: dict[str, Any]) -> int:
    """The oldest layout version that holds the deployment's tensors `deploy` and metadata (extra["deployment"]): 3
    with prompt-map fusion on trained types, 2 with an added type's bank of rows, else 1 (what every earlier onenip
    reads)."""
    if float(extra.get("deployment", {}).get("prompt_fusion", 0.0)) > 0:
        return 3
    banks = [v for k, v in deploy.items() if k.startswith("prompt_patches.") and v.ndim == 2]
    return 2 if banks else 1


def save_checkpoint(path: str | Path, ckpt: CheckpointState) -> Path:
    """Write `ckpt` atomically to `path` (a .safetensors file); also returns the path."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    tensors.update({f"net.{k}": v.detach().cpu().contiguous() for k, v in ckpt.net.items()})
    tensors.update({f"backbone.{k}": v.detach().cpu().contiguous() for k, v in ckpt.backbone.items()})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": _layout_version(ckpt.deploy, ckpt.extra),
        "config": ckpt.config.to_dict(),
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "history": ckpt.history,
        "extra": ckpt.extra,
        "torch": torch.__version__,
    }
    if ckpt.optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(ckpt.optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    tensors.update({f"rng.{k}": v.contiguous() for k, v in ckpt.rng.items()})
    tensors.update({f"deploy.{k}": v.detach().cpu().contiguous() for k, v in ckpt.deploy.items()})
    data = st_save(tensors, metadata={"onenip": json.dumps(meta)})
    atomic_write_bytes(path, data)
    return path


def check_output_folder(path: str | Path, option: str) -> Path:
    """Raise ConfigError naming `option` when `path` cannot become a folder: it, or a folder above it, is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{option} {path}: {p} is a file, not a folder")
            break
    return path


def check_output_file(path: str | Path, option: str, models: bool = False) -> Path:
    """Raise ConfigError naming `option` when the file `path` cannot or must not be written: it is a folder, a
    folder above it is a file, or it is an onenip training checkpoint (what --resume continues from); with `models`
    (exports, reports), any onenip checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; name the file to write")
    check_output_folder(path.parent, option)
    meta = _onenip_metadata(path) if path.is_file() else None
    if meta is not None and "optimizer" in meta:
        raise ConfigError(f"{option} {path} is a training checkpoint (what onenip fit --resume continues from); "
                          "write elsewhere")
    if meta is not None and models:
        raise ConfigError(f"{option} {path} is an onenip model; write elsewhere")
    return path


def _onenip_metadata(path: str | Path) -> dict[str, Any] | None:
    """The onenip metadata of a checkpoint file, or None when it is not a readable onenip checkpoint."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("onenip")
        return json.loads(raw) if raw is not None else None
    except Exception:  # not safetensors, truncated, invalid JSON: load_checkpoint says why
        return None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex (results.json records the tested model's, for the report to compare)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_file(path: str | Path, with_training_state: bool = True) -> Path:
    """The checkpoint file `path` names: itself, or in a run folder the trained model (model.safetensors) when the
    training state is not wanted, the last training checkpoint (checkpoints/last.safetensors) when it is."""
    path = Path(path)
    if not path.is_dir():
        return path
    names = ["checkpoints/last.safetensors", "checkpoint.safetensors"]
    if not with_training_state:
        names = ["model.safetensors", "checkpoint.safetensors", "checkpoints/last.safetensors"]
    found = next((path / n for n in names if (path / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{path} is a folder without {', '.join(names[:-1])} or {names[-1]}")
    return found


def load_checkpoint(path: str | Path, with_training_state: bool = True) -> CheckpointState:
    """Read a checkpoint (a file, or a run folder: see `checkpoint_file`); a missing, corrupted, truncated or foreign
    file raises CheckpointError naming it."""
    path = checkpoint_file(path, with_training_state)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = (f.metadata() or {}).get("onenip")
            if raw_meta is None:
                raise CheckpointError(f"{path} is a safetensors file but not an onenip checkpoint (no 'onenip' metadata)")
            meta = json.loads(raw_meta)
            keys = list(f.keys())
            wanted = [k for k in keys if with_training_state or k.startswith(("net.", "backbone.", "deploy."))]
            tensors = {k: f.get_tensor(k) for k in wanted}
    except CheckpointError:
        raise
    except Exception as exc:  # header too large, truncated data, invalid JSON, not safetensors at all ...
        exported = {".onnx": "ONNX", ".xml": "OpenVINO", ".pt": "TorchScript"}.get(path.suffix)
        if exported:
            raise CheckpointError(
                f"{path} is an exported model ({exported}), not an onenip checkpoint: give the checkpoint it was "
                "exported from (model.safetensors), or run the export itself (onenip predict / onenip serve, "
                "onenip.Predictor.load, onenip.deploy.runtimes.open_runtime)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupted, truncated or not a checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    if int(meta.get("version", -1)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is newer than this onenip ({VERSION})")
    try:
        config = config_of_checkpoint(meta["config"])
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{path}: its configuration is not valid for this onenip version: {exc}") from None
    net = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    backbone = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    deploy = {k[7:]: v for k, v in tensors.items() if k.startswith("deploy.")}
    optimizer = _unflatten_optimizer(optim, meta["optimizer"]) if with_training_state and "optimizer" in meta else None
    return CheckpointState(
        config=config, net=net, backbone=backbone, epoch=int(meta.get("epoch", 0)), step=int(meta.get("step", 0)),
        optimizer=optimizer, rng=rng, history=list(meta.get("history", [])), extra=dict(meta.get("extra", {})),
        deploy=deploy,
    )


ARCHITECTURE_KEYS = ("backbone", "model")


def incompatible_keys(a: Config, b: Config) -> list[str]:
    """Options that must be equal for weights of `a` to be loaded into a model built from `b` (call `adopt_resolved`
    first, so that b's 'auto' takes a's resolved value)."""
    da, db = a.to_dict(), b.to_dict()
    diffs = [f"{s}.{k}" for s in ARCHITECTURE_KEYS for k in da[s] if da[s][k] != db[s][k] and k != "weights"]
    if a.data.input_size != b.data.input_size:
        diffs.append("data.input_size")
    return diffs


def adopt_resolved(saved: Config, cfg: Config) -> None:
    """Give `cfg` (a resumed run's or an evaluation's configuration) what the saved model resolved where `cfg` says
    'auto', so that the model is rebuilt as it was trained."""
    if cfg.backbone.padding == "auto":
        cfg.backbone.padding = saved.backbone.padding


def config_of_checkpoint(raw: dict) -> Config:
    """A checkpoint's configuration. Options a model resolves when built are stored resolved; a checkpoint written
    before backbone.padding existed padded dynamically."""
    config = config_from_dict(raw)
    if "padding" not in raw.get("backbone", {}):
        config.backbone.padding = "dynamic"
    return config
