"""A fast training step makes no host-device synchronisation it does not need.

On a GPU, two things make the host wait for the device: reading a value back (`.item()`, `bool(tensor)`, a Python
`if` on a tensor: ATen's `_local_scalar_dense`) and turning host data into a tensor (`torch.tensor(list)`,
`torch.from_numpy`: ATen's `lift_fresh`, followed by a blocking copy to the device). Both are counted here, on the CPU,
with a dispatch-mode hook, over fast-engine steps in the middle of an epoch with the GPU's settings (NaN check every 25
steps, the torch.where form of the synthesis). Constants are built once per device, the epoch's order is copied once
per epoch, and the feature-jitter coin is a device tensor: none of them may come back unseen.

Excluded, because they cost nothing on a GPU: reads inside torch.optim (the non-fused Adam keeps its step counters
on the host; the fast engine on CUDA uses the fused Adam, whose counters live on the device).
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from onenip.api import make_config
from onenip.training.trainer import Trainer

WAITS = ("aten._local_scalar_dense.default", "aten.lift_fresh.default")


class HostWaits(TorchDispatchMode):
    """Counts the operations that make a GPU's host wait, by the onenip line that caused them."""

    def __init__(self) -> None:
        super().__init__()
        self.found: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if str(func) in WAITS:
            stack = traceback.extract_stack()
            if not any("torch/optim" in f.filename for f in stack):
                ours = [f for f in stack if "/onenip/" in f.filename and "tests" not in f.filename]
                where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "outside onenip"
                self.found[f"{func} at {where}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("restoration", [True, False])
def test_a_fast_step_makes_no_needless_host_waits(tmp_path: Path, gen_data: Path, gen_textures: Path,
                                                  restoration: bool) -> None:
    cfg = make_config(None, [
        f"data.roots=[{gen_data}]", "data.categories=[bracket, grain]", "data.input_size=64",
        f"data.textures={gen_textures}", "data.workers=0", "backbone.name=tf_efficientnet_lite0",
        "backbone.weights=efficientnet-lite", "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4",
        "model.refiner_channels=32", "train.batch_size=4", "train.epochs=1", "train.device=cpu", "train.engine=fast",
        "train.cache_features=true", f"train.restoration={str(restoration).lower()}", f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, progress=False)
    trainer.sync_every = 25  # as on CUDA: the NaN check is not due at these steps
    trainer.loader.synthesizer.select_by_index = False  # the form a GPU runs
    batches = iter(trainer.loader)
    for _ in range(3):  # warm up: the first batch copies the epoch's order, the first uses build the constants
        trainer.train_step(next(batches))
    counter = HostWaits()
    with counter:
        for _ in range(2):
            trainer.train_step(next(batches))
    assert dict(counter.found) == {}


def test_the_counter_sees_a_planted_wait() -> None:
    counter = HostWaits()
    with counter:
        x = torch.arange(4.0)
        if x.sum() > 0:  # a Python `if` on a tensor
            torch.tensor([1, 2])  # host data
    assert sum(counter.found.values()) == 2
