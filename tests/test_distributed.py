"""Training with several processes (torchrun, DistributedDataParallel, gloo on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onenip.api import make_config
from onenip.errors import ConfigError
from onenip.training.distributed import DistInfo, env_info, per_rank_batch
from onenip.training.trainer import Trainer

CATS = "[bracket, grain]"


def overrides(gen_data: Path, gen_textures: Path, *extra: str) -> list[str]:
    # jitter, dropout and the refiner's BatchNorm are per process by design; without them N processes = 1 process
    return [f"data.roots=[{gen_data}]", f"data.categories={CATS}", "data.input_size=64", f"data.textures={gen_textures}",
            "data.workers=0", "backbone.name=tf_efficientnet_lite0", "backbone.weights=efficientnet-lite",
            "model.hidden_dim=64", "model.ffn_dim=128", "model.heads=4", "model.refiner=false", "model.dropout=0",
            "model.jitter_scale=0", "train.batch_size=8", "train.epochs=50", "train.max_steps=2", "train.device=cpu",
            "train.lr=1e-3", *extra]


def net_weights(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "checkpoints" / "last.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("net.")}


@pytest.mark.slow
def test_two_gloo_processes_take_the_step_of_one_process_over_the_global_batch(tmp_path: Path, gen_data: Path,
                                                                               gen_textures: Path) -> None:
    single = Trainer(make_config(None, overrides(gen_data, gen_textures, f"output_dir={tmp_path / 'one'}")), progress=False)
    single.run()

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "onenip.cli",
           "fit", "--no-progress"]
    for item in overrides(gen_data, gen_textures, f"output_dir={tmp_path / 'two'}"):
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one, two = net_weights(tmp_path / "one"), net_weights(tmp_path / "two")
    assert one.keys() == two.keys() and one
    init = single_init(single)
    moved = [k for k in one if not torch.equal(one[k], init[k])]
    assert len(moved) > 0.9 * len(one), "the weights did not move: the test would not see a difference"
    # Attention's key bias cannot change the output (softmax ignores a constant added to every key's score), so its
    # gradient is rounding noise around zero, which Adam's normalisation turns into steps of +-lr of either sign.
    # The same happens to the odd element whose gradient is near zero by chance (1 of 376,704 on the generated data,
    # off by 3e-6): a few such elements may differ by more than 2e-6, by far less than another batch would move them.
    compared = [k for k in one if not k.endswith("k_proj.bias")]
    diff = {k: (two[k] - one[k]).abs() for k in compared}
    off = {k: int((d > 2e-6).sum()) for k, d in diff.items() if (d > 2e-6).any()}
    assert sum(off.values()) <= 1e-5 * sum(d.numel() for d in diff.values()), off
    assert max(float(d.max()) for d in diff.values()) < 2e-5, {k: float(diff[k].max()) for k in off}
    # rank 0 alone wrote the run folder: one log row per epoch, the model with its deployment
    assert (tmp_path / "two" / "model.safetensors").is_file()
    log = (tmp_path / "two" / "train_log.csv").read_text().splitlines()
    assert len(log) == 2 and log[1].split(",")[1] == "2"  # one epoch row, at step 2


@pytest.mark.slow
def test_two_gloo_processes_on_the_fast_engine_take_the_step_of_one_process(tmp_path: Path, gen_data: Path,
                                                                             gen_textures: Path) -> None:
    """The fast engine's batches made on the device, sharded over two processes. Its synthetic images and random
    prompts are drawn per process, so the two runs compare only without them (no restoration, a static prompt)."""
    extra = ("train.engine=fast", "train.restoration=false", "train.prompt=static")
    single = Trainer(make_config(None, overrides(gen_data, gen_textures, *extra, f"output_dir={tmp_path / 'one'}")),
                     progress=False)
    single.run()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "onenip.cli",
           "fit", "--no-progress"]
    for item in overrides(gen_data, gen_textures, *extra, f"output_dir={tmp_path / 'two'}"):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one, two = net_weights(tmp_path / "one"), net_weights(tmp_path / "two")
    init = single_init(single)
    assert one.keys() == two.keys() and all(not torch.equal(one[k], init[k]) for k in one)
    # Two Adam steps of lr 1e-3: other global batches would move most weights differently by ~1e-3. Here the static
    # prompt leaves some gradients at rounding-noise size (as attention's key bias above), which Adam's normalisation
    # amplifies, so a few elements differ (111 of 376,704 when written; the plain engine in this setting: 86).
    total = sum(v.numel() for v in one.values())
    off = sum(int(((two[k] - one[k]).abs() > 2e-6).sum()) for k in one)
    assert off < 1e-3 * total, f"{off} of {total} weights differ by more than 2e-6"
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 5e-4


def single_init(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The network's initial weights (the seed fixes them)."""
    torch.manual_seed(trainer.cfg.train.seed)
    from onenip.models.detector import Detector

    fresh = Detector.build(trainer.cfg).net
    return {f"net.{k}": v for k, v in fresh.state_dict().items()}


def test_global_batch_must_divide_among_processes() -> None:
    assert per_rank_batch(64, DistInfo(rank=1, world_size=8, local_rank=1)) == 8
    with pytest.raises(ConfigError, match="train.batch_size=10.*3 processes"):
        per_rank_batch(10, DistInfo(rank=0, world_size=3))


def test_torchrun_environment_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_info() == DistInfo(0, 1, 0) and not env_info().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_info() == DistInfo(2, 4, 0) and not env_info().is_main
    monkeypatch.setenv("RANK", "7")
    with pytest.raises(ConfigError, match="RANK=7, WORLD_SIZE=4"):
        env_info()
