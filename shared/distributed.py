"""torchrun / DistributedDataParallel set-up for train.py.

``torchrun --nproc_per_node G train.py ...`` starts G processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; multi-node runs add torchrun's ``--nnodes``,
``--rdzv-backend`` and ``--rdzv-endpoint`` flags and need nothing here. Each process trains on its own
share of every epoch (see :class:`shared.data.EpochSampler`), so ghost batch norm and ghost noise act on
each process's own batch of ``--batch-size`` samples; only ``--sync-bn`` turns plain BatchNorm layers
into SyncBatchNorm. The backend is NCCL on CUDA and gloo on CPU.

If one process dies, torchrun's agent stops the others (its default "fail fast" policy) and exits
non-zero; collectives also time out after :data:`COLLECTIVE_TIMEOUT` instead of hanging forever. The
run then resumes from its last checkpoint with ``--resume auto``.

Preemption: SIGTERM/SIGUSR1 may reach any subset of the processes (torchrun passes SIGTERM on to its
workers); train.py asks :func:`any_process` at every update boundary, so all ranks stop at the same one
and rank 0 writes the checkpoint. ``shared.sweep`` starts torchrun (one per node, c10d rendezvous for
several nodes) and turns torchrun's exit 1 after a signal into the requeue code.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "COLLECTIVE_TIMEOUT", "init_distributed", "shutdown", "all_reduce_sum", "gather_objects",
           "any_process"]

# Collectives that wait longer than this raise instead of hanging (e.g. a peer that died silently).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("GHOST_NOISE_COLLECTIVE_TIMEOUT_MIN", "30")))


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the only process that logs, writes files and talks to wandb."""
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes (or none when run as a single process).

    Args:
        device: ``--device`` (None: ``cuda:LOCAL_RANK`` if CUDA is available, else ``cpu``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda":  # without an index, torchrun's process LOCAL_RANK takes GPU LOCAL_RANK
        chosen = torch.device("cuda", local_rank if chosen.index is None else chosen.index)
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


# How long shutdown() lets gloo's worker threads finish before the process group is destroyed.
GLOO_DRAIN_S = 0.2


def shutdown() -> None:
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # A gloo worker thread frees a finished collective's tensors after waking the waiter, and
        # freeing a tensor that Python also knew needs the GIL. On torch 2.11 the process group's
        # destructor joins those threads while holding the GIL: a worker still freeing deadlocks the
        # exit (seen in a 2-process CPU test: results written, one rank never exited). Sleeping
        # releases the GIL so the workers finish first.
        time.sleep(GLOO_DRAIN_S)
    dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``values`` over all processes (``values`` itself when there is one)."""
    if info.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_process(flag: bool, info: DistInfo) -> bool:
    """True on every process if ``flag`` is True on any (keeps the processes in step)."""
    if not info.distributed:  # (no tensor: one process needs no device sync per call)
        return flag
    return all_reduce_sum(torch.tensor([float(flag)], device=info.device), info).item() > 0


def gather_objects(value: Any, info: DistInfo) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every process."""
    if not info.distributed:
        return [value]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered
