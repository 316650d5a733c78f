"""Process groups for data-parallel training (torchrun, the Ray actor group) and small collectives.

One process group serves both kinds of tensors a rank reduces: gradients and weights on the
training device, and small CPU tensors (token counts, loss sums, metrics, non-finite flags,
replica checksums). On CPU the group is gloo. On CUDA it is one default group with a backend per
device type, ``"cpu:gloo,cuda:nccl"`` (torch's ``init_process_group`` backend string): a
collective on a CUDA tensor runs on nccl, one on a CPU tensor on gloo, so the same call
(:func:`all_reduce`, ``torch.distributed.all_reduce``) works on either. Plain ``"nccl"`` would
refuse every CPU tensor ("No backend type associated with device type cpu").

:func:`join_process_group` is the one way a monet process joins a group (torchrun through
:func:`init_distributed`, the Ray actor group through :func:`monet.rl.group.init_process_group`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: the backend per device type of a CUDA run (see the module docstring)
CUDA_BACKEND = "cpu:gloo,cuda:nccl"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for ranks training on ``device``: ``"gloo"`` on CPU,
    ``"cpu:gloo,cuda:nccl"`` on CUDA (nccl for CUDA tensors, gloo for CPU tensors)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "gloo"
    if kind == "cuda":
        return CUDA_BACKEND
    raise ValueError(f"no process-group backend for device type {kind!r} (monet trains on cpu or cuda)")


def join_process_group(device: torch.device | str, *, local_rank: int = 0, **init_kwargs) -> None:
    """``torch.distributed.init_process_group`` with :func:`backend_for` ``(device)``. On CUDA this
    rank's GPU becomes the current device first (``device``'s index, else ``local_rank``), so
    ``"cuda"`` tensors of different ranks land on different GPUs, as nccl requires.
    ``init_kwargs``: ``init_method``, ``rank``, ``world_size``... (default: torchrun's environment)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else local_rank)
    dist.init_process_group(backend_for(device), **init_kwargs)


def check_cpu_collectives() -> None:
    """Raise a clear error when the default process group (set up by someone else, e.g. a launcher
    that called ``init_process_group("nccl")``) has no backend for CPU tensors, which monet's
    trainers reduce; otherwise the first CPU reduction would fail deep inside torch."""
    config = str(dist.get_backend_config())  # e.g. "cuda:nccl", "cpu:gloo, cuda:nccl"
    devices = {part.split(":")[0].strip() for part in config.split(",") if ":" in part}
    if "cpu" not in devices:
        raise RuntimeError(
            f"the torch.distributed process group was initialised with backend {config!r}, which cannot reduce CPU "
            f"tensors (monet's trainers reduce counts, metrics and non-finite flags on the CPU); initialise it with "
            f"backend={CUDA_BACKEND!r} (monet.train.distributed.backend_for), or let monet initialise it")


def init_distributed(device: torch.device, *, group_of_one: bool = False) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK are torchrun's launch
    contract) with :func:`join_process_group`; a plain ``python`` run is a world of one. A group
    that is already up is used as is if it can reduce CPU tensors (:func:`check_cpu_collectives`).

    A world of one needs no group, except for DeepSpeed, whose engine requires one even for a single
    rank: with ``group_of_one`` (a DeepSpeed run) such a process (plain ``python``, or
    ``torchrun --nproc_per_node 1``) joins a one-rank group on an in-process store
    (``torch.distributed.HashStore``: no address, port or rendezvous file), which
    :func:`shutdown_distributed` removes again. DeepSpeed's engine also insists on the launcher's
    ``LOCAL_RANK`` variable ("set by the deepspeed launcher ... or the torch's launcher"): for a
    one-rank group that monet starts itself, monet is that launcher and sets it to ``0`` when
    absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not group_of_one:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        check_cpu_collectives()
    elif world <= 1:
        join_process_group(device, local_rank=local_rank, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # the launch contract DeepSpeed checks
    else:
        join_process_group(device, local_rank=local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce(x: torch.Tensor, info: DistInfo, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """``op`` over the ranks of ``x`` (a new tensor; ``x`` itself is untouched), on ``x``'s device:
    CPU tensors on gloo, CUDA tensors on nccl (module docstring). A world of one returns ``x``."""
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=op)
    return x


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over the ranks of ``x`` (:func:`all_reduce`)."""
    return all_reduce(x, info, dist.ReduceOp.SUM)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group cleanly (its threads must be joined before interpreter exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
