"""Training across processes and machines with `torch.distributed`: each step's batch is split between the
processes, their gradients are averaged, and every process takes the same optimiser step.

Launch any training command under `torchrun` (e.g. `torchrun --nproc-per-node 2 -m kshot train RECIPE`); the
trainer joins the process group that torchrun's environment describes. The recipe's batch (a meta-batch of
tasks, a batch of images or pairs) stays the global batch, so a recipe means the same thing on any number of
processes. `DistributedDataParallel` is not used: its reducer expects one forward through the wrapper and one
backward, which MAML's inner `autograd.grad` calls (and higher-order graphs) do not fit; one `all_reduce` of the
flattened gradients after the backward does the same averaging for every learner.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kshot.episode import Episode

TIMEOUT = timedelta(minutes=60)  # the main process validates and saves while the others wait at a collective


class ShardError(ValueError):
    """A training batch that cannot be split evenly between the processes."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a distributed run (rank 0, the main process, logs, saves and writes results)."""

    rank: int
    world_size: int
    owned: bool = False  # this code initialised the group, so it destroys it when training ends

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(device: torch.device) -> ProcessGroup | None:
    """The process group of a run launched by torchrun (or one the caller already initialised), or None when
    training in a single process. Uses NCCL on CUDA and Gloo on CPU."""
    if not dist.is_available():
        return None
    owned = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each process's communicator to its current GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        owned = True
    if dist.get_world_size() <= 1:
        return None
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), owned)


def current_group() -> ProcessGroup | None:
    """The process group this process is in, if it has more than one process (without joining one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroup(dist.get_rank(), dist.get_world_size())
    return None


def gather_scores(scores: list[float], group: ProcessGroup, total: int, device: torch.device) -> list[float]:
    """Per-episode scores of a set split round-robin (process r scored episodes r, r + world size, ...),
    back in episode order on every process."""
    full = torch.zeros(total, dtype=torch.float64, device=device)
    full[group.rank::group.world_size] = torch.tensor(scores, dtype=torch.float64, device=device)
    dist.all_reduce(full)
    return full.tolist()


def local_device(device: str | torch.device) -> torch.device:
    """The device this process should train on: under torchrun, a bare "cuda" means this process's own GPU
    (cuda:LOCAL_RANK), so that the processes of one machine do not all crowd onto the first."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def leave_process_group(group: ProcessGroup | None) -> None:
    """Destroy the process group if `join_process_group` created it, all processes together: a process that tore
    down its Gloo connections while another was still working (the main one writing results) could make that
    one's Gloo thread abort with "terminate called without an active exception". When leaving because of an
    error (called from a `finally` with an exception in flight), the other processes may be inside another
    collective, so there is no barrier: the group is torn down at once and their collectives fail."""
    if group is not None and group.owned and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(device: str | torch.device) -> Iterator[ProcessGroup | None]:
    """Join the process group torchrun's environment describes (None in a single process) for the duration of a
    command, so that its training and its evaluation both run on every process; leave it at the end."""
    group = join_process_group(local_device(device))
    try:
        yield group
    finally:
        leave_process_group(group)


def is_main_process() -> bool:
    """False only in the non-zero ranks of a distributed run (which must not evaluate or write results); also
    right after training, when the trainer has left the process group torchrun's environment describes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """This process's equal, contiguous part of a training batch: the tasks of a meta-batch `Episode`, or the
    rows of a tensor (applied to each item of a tuple, list or dict)."""
    if isinstance(batch, Episode):
        if not batch.is_batched:
            raise ShardError(f"training on {world_size} processes splits each step's batch between them, but this "
                             f"batch is a single episode; set train.meta_batch to a multiple of {world_size}")
        size = _shard_size(batch.batch_size, world_size, "tasks in the meta-batch (train.meta_batch)")
        part = slice(rank * size, (rank + 1) * size)
        return Episode(batch.support_x[part], batch.support_y[part], batch.query_x[part], batch.query_y[part],
                       batch.classes[part])
    if isinstance(batch, Tensor):
        size = _shard_size(len(batch), world_size, "rows in the batch (the learner's batch_size)")
        return batch[rank * size:(rank + 1) * size]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(item, rank, world_size) for item in batch)
    if isinstance(batch, dict):
        return {key: shard(value, rank, world_size) for key, value in batch.items()}
    raise ShardError(f"cannot split a training batch of type {type(batch).__name__} between processes")


def _shard_size(total: int, world_size: int, what: str) -> int:
    if total % world_size:
        raise ShardError(f"{total} {what} cannot be split evenly between {world_size} processes; make it a "
                         f"multiple of {world_size}")
    return total // world_size


def average_gradients(parameters: list[nn.Parameter], values: list[float]) -> list[float]:
    """Average the parameters' gradients and `values` (losses, metrics) over all processes, with one all_reduce;
    returns the averaged values. A gradient missing on one process counts as zero there; one missing on every
    process stays None, as it would in a single process (so the optimiser skips that parameter)."""
    world_size = dist.get_world_size()
    reference = parameters[0] if parameters else torch.zeros(())
    present = [1.0 if p.grad is not None else 0.0 for p in parameters]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads] +
                     [torch.tensor(present + list(values), dtype=reference.dtype, device=reference.device)])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)
        offset += g.numel()
    tail = flat[offset:].tolist()
    for p, presence in zip(parameters, tail[:len(parameters)]):
        if presence == 0:
            p.grad = None
    return tail[len(parameters):]


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (batch-norm running statistics) over all processes, so the processes'
    copies of the model stay identical although each normalised its own part of the batch."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def broadcast_module(module: nn.Module) -> None:
    """Give every process the main process's parameters and buffers."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is true on any (e.g. the main process's time budget has run out)."""
    return on_any_process((flag,), device)[0]


def on_any_process(flags: tuple[bool, ...], device: torch.device) -> tuple[bool, ...]:
    """Each flag true on every process when it is true on any, for several flags in one collective (the
    trainer's per-step stop checks)."""
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def barrier() -> None:
    dist.barrier()
