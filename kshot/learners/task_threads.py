"""Meta-gradients of a meta-batch's tasks computed on several CPU threads at once.

On a CPU the kernels of one small task (a 5-way episode through Conv-4) are too small for intra-op threads
to pay well. Splitting the *tasks* between threads, each with one intra-op thread, is the other way to use
several cores. It is opt-in (the MAML family's `task_threads` option): on this project's 2-core machine it
measured 1.05x and 1.20x the same loop on 2 intra-op threads, with 1 and 15 queries a class, and two
processes of 16 tasks each ran a meta-batch only 1.7x faster than one process on one core.
`torch.func.functional_call` swaps tensors into a module
while it runs, so threads cannot share one module: each thread works on its own replica of the learner,
refreshed from the learner before every meta-batch. A replica's parameters hold the same values as the
learner's, so the gradients it computes are the learner's; they are summed in a fixed order, so a given
thread count always gives the same result (equal to the one-thread loop up to float rounding).

Batch-norm running statistics: each replica updates its own along its share of the tasks; afterwards the
learner gets their average (the running statistics only matter for inference-mode evaluation; the
gradient-based recipes evaluate transductively).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from kshot.learners.gradient import TaskFn, add_gradients, per_task_gradients


def pool_for(owner: nn.Module, threads: int) -> TaskThreads:
    """The task-thread pool of `owner`, made (or remade, after its layout changed) on first use. Kept outside
    the module, so that copying, saving or moving the learner never meets threads."""
    pool = _POOLS.get(owner)
    if pool is None or not pool.matches(owner, threads):
        pool = _POOLS[owner] = TaskThreads(owner, threads)
    return pool


class TaskThreads:
    """A pool of `threads` worker threads, each with a replica of `owner`, that computes per-task gradients."""

    def __init__(self, owner: nn.Module, threads: int) -> None:
        if threads < 2:
            raise ValueError(f"TaskThreads needs at least 2 threads, got {threads}")
        self.threads = threads
        self.replicas = [replicate(owner) for _ in range(threads)]
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kshot-task")

    def matches(self, owner: nn.Module, threads: int) -> bool:
        """Whether this pool can serve `owner` (same thread count, same parameter and buffer layout)."""
        mine = [(t.shape, t.dtype, t.device) for t in tensors_of(self.replicas[0])]
        return threads == self.threads and mine == [(t.shape, t.dtype, t.device) for t in tensors_of(owner)]

    def gradients(self, owner: nn.Module, tasks: int, task_fn: TaskFn
                  ) -> tuple[list[Tensor | None], list[Tensor], list[Tensor]]:
        """Gradients of mean_task(loss) with respect to owner's trainable parameters, with every task's
        (detached) loss and outputs in task order."""
        for replica in self.replicas:
            sync(replica, owner)
        shares = [range(start, tasks, self.threads) for start in range(self.threads)]
        intra_op = torch.get_num_threads()
        try:
            results = list(self.pool.map(lambda args: one_thread_share(*args, tasks, task_fn),
                                         zip(self.replicas, shares)))
        finally:
            torch.set_num_threads(intra_op)  # the workers set theirs to 1; keep the caller's as it was
        grads: list[Tensor | None] = [None] * len(results[0][0])
        for share_grads, _, _ in results:
            grads = add_gradients(grads, share_grads)
        by_task: dict[int, tuple[Tensor, Tensor]] = {}
        for (_, losses, outputs), share in zip(results, shares):
            by_task.update({i: (loss, out) for i, loss, out in zip(share, losses, outputs)})
        average_running_stats(owner, self.replicas)
        return grads, [by_task[i][0] for i in range(tasks)], [by_task[i][1] for i in range(tasks)]


_POOLS: weakref.WeakKeyDictionary[nn.Module, TaskThreads] = weakref.WeakKeyDictionary()


def replicate(owner: nn.Module) -> nn.Module:
    """A deep copy of `owner` whose parameters are leaves that need gradients as the owner's do."""
    replica = copy.deepcopy(owner)
    for mine, theirs in zip(replica.parameters(), owner.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    return replica


def tensors_of(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def sync(replica: nn.Module, owner: nn.Module) -> None:
    """Make the replica compute what owner would: its parameter and buffer values, every submodule's
    train/eval mode, and the learner's options (shared, read-only during a meta-batch)."""
    with torch.no_grad():
        for mine, theirs in zip(tensors_of(replica), tensors_of(owner)):
            mine.copy_(theirs)
    for mine, theirs in zip(replica.modules(), owner.modules()):
        mine.training = theirs.training
    if hasattr(owner, "options"):
        replica.options = owner.options


def one_thread_share(replica: nn.Module, share: Sequence[int], tasks: int, task_fn: TaskFn
                     ) -> tuple[list[Tensor | None], list[Tensor], list[Tensor]]:
    """One worker thread's tasks on its replica, each backpropagated at once, on one intra-op thread."""
    torch.set_num_threads(1)  # this thread's own OpenMP setting: one core per thread
    return per_task_gradients(replica, share, tasks, task_fn)


def average_running_stats(owner: nn.Module, replicas: Sequence[nn.Module]) -> None:
    """Owner's floating-point buffers become the replicas' average; counters advance by the replicas' sum."""
    with torch.no_grad():
        for name, buffer in owner.named_buffers():
            values = [dict(r.named_buffers())[name] for r in replicas]
            if buffer.is_floating_point():
                buffer.copy_(torch.stack(values).mean(0))
            else:
                buffer.add_(sum(v - buffer for v in values))
