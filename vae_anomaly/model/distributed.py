"""Several training processes, started by torchrun, as one: the process group and its few collectives.

torchrun gives each process WORLD_SIZE, RANK and LOCAL_RANK (and where to
meet) in its environment. `launched()` reads them; `init()` joins the group
(gloo on CPU, NCCL with one GPU per process); `current()` says which
process this is. A plain run sees no such variables: it never initialises
torch.distributed, and every helper of the one-process `World` returns at
once, so single-process results stay exactly what they were.

Nothing here imports click or rich; `train.py` and `detector.py` take a
`World` and stay usable without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from ..errors import DistributedError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job. The default is a run of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # Where collectives' tensors must live: NCCL reduces GPU tensors only.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes checkpoints and writes the model file."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This process's contiguous slice [lo, hi) of n items; sizes differ by at most one."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over all processes (a new tensor on t's device); every process gets the same bits."""
        if self.size == 1:
            return t
        buf = t.detach().to(self.device, copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every process (pickled in transit: only between processes of one job)."""
        if self.size == 1:
            return obj
        box: list[Any] = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return cast(T, box[0])

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the same variables) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def init(device: str = "auto") -> World:
    """Join the job: gloo when training on CPU, NCCL with GPU LOCAL_RANK when on CUDA.

    `device` is the fit option (auto, cpu, cuda or cuda:N); under torchrun a
    CUDA process always trains on the GPU numbered by its LOCAL_RANK, one
    process per GPU, which is what `--nproc-per-node` = GPUs per machine gives.
    """
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run fit without torchrun")
    if dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise DistributedError(
                f"process with LOCAL_RANK {local_rank} needs GPU {local_rank}, but this machine has {gpus}: "
                f"start at most --nproc-per-node {gpus} processes here, or train with --device cpu"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        if not dist.is_gloo_available():
            raise DistributedError("this torch build has no gloo backend for CPU training; run fit without torchrun")
        dist.init_process_group("gloo")
    return current()


def current() -> World:
    """The job this process belongs to: the initialised process group, else a world of one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def is_main() -> bool:
    """True in a single-process run and on rank 0 of a job."""
    return current().is_main


def destroy() -> None:
    """Leave the process group, if this process joined one (so the process exits cleanly)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
