"""Several processes, one model: DistributedDataParallel training started by `torchrun`.

    torchrun --nproc_per_node 8 --no-python onenip fit --config configs/mvtec-paper.yaml

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; `onenip fit` reads them and, when WORLD_SIZE > 1, joins the process
group (NCCL on GPUs, gloo on the CPU), takes one GPU per process (cuda:LOCAL_RANK), and trains with
`DistributedDataParallel`:

* **Batch and learning rate.** `train.batch_size` is the GLOBAL batch of query images per optimizer step; each of the
  N processes takes batch_size / N of it (batch_size must be divisible by N). Gradients are averaged over processes, so
  one step of N processes equals one step of a single process over the whole batch and `train.lr` needs no scaling
  with the number of GPUs. The paper's run (8 GPUs x 8 images, lr 1e-4) is batch_size=64, lr=1e-4 on any number of
  GPUs.
* **Data.** Every process builds the same item list; the epoch's permutation (seeded by seed and epoch) is sharded,
  process r taking elements r, r+N, r+2N, ... (padded to equal length). Items are seeded by (seed, epoch, index), so
  the samples of a step do not depend on N.
* **What differs from one process.** Stochastic regularisers (feature jitter, dropout) draw from each process's own
  generator, and the refiner's BatchNorm uses per-process batch statistics, as in the authors' code (plain per-GPU
  BatchNorm2d). With jitter and dropout off and no refiner, N processes give the weights of one process (tested).
* **Files.** Only rank 0 writes the run folder (config, log, checkpoints, model, evaluation); the others wait for it.
  Resuming restores rank 0's generator state on rank 0; the other ranks re-seed from (seed, rank, step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from onenip.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The process's place as torchrun's environment variables describe it (a single process without them)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"cannot read torchrun's RANK/WORLD_SIZE/LOCAL_RANK environment variables: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def setup(device_name: str) -> tuple[DistInfo, torch.device | None]:
    """Join the process group when started by torchrun with several processes.

    Returns the process's DistInfo and the device it must train on (None: choose as usual, single process).
    """
    info = env_info()
    if not info.enabled:
        return info, None
    want_cuda = device_name == "auto" and torch.cuda.is_available() or device_name.startswith("cuda")
    if want_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={device_name!r} but CUDA is not available on this machine")
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return info, device


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """This process's share of the global batch."""
    if batch_size % info.world_size:
        raise ConfigError(f"train.batch_size={batch_size} (the global batch) is not divisible by the "
                          f"{info.world_size} processes; choose a multiple of {info.world_size}")
    return batch_size // info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all processes (itself when there is one)."""
    if not info.enabled:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
