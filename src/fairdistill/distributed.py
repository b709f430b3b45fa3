"""Multi-process data parallel training under ``torchrun`` (PyTorch's own DDP engine).

``torchrun --nproc_per_node=N -m fairdistill train CONFIG ...`` starts N processes; each reads
RANK / WORLD_SIZE / LOCAL_RANK from the environment. The student and every trainable method
module are wrapped together in one DistributedDataParallel; the teacher stays outside. Each
process takes its rows of every global batch (``data.batch_size`` is the global batch), metrics
and fairness counts are summed over processes, and only rank 0 writes files. Backend: NCCL on
CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[DistContext, torch.device]:
    """Join the process group when started by torchrun; returns the context and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), torch.device(device)
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but CUDA is not available here; use device=cpu")
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return ctx, dev


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over processes (in place on a copy); identity in a single process."""
    if not ctx.enabled:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
