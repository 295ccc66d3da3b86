"""Inner-loop machinery of the gradient-based learners: differentiable SGD steps on a parameter dict, run
through `torch.func.functional_call`, so any `nn.Module` can be adapted without copying or patching it.

Strategies over the tasks of a meta-batch (chosen by `pick_strategy`):
- "loop": a plain Python loop over tasks, one functional forward/grad per task. Measured on CPU this is the
  fastest for convolutional networks: under `vmap`, per-task weights turn every convolution into a grouped
  convolution, which was about 2x slower than the loop with 15 queries a class (see BENCHMARKS.md).
- "vmap": `torch.func.vmap` over tasks with `torch.func.grad` inside; per-task linear layers become batched
  matrix products, which pays for small fully connected networks (the sinusoid MLP). Batch norm works: each task
  is normalised with its own batch statistics in training mode, and the running statistics are then updated to
  what the loop leaves (`kshot.learners.vmap_batchnorm`, which also works around a PyTorch bug in second order).
  Random layers (dropout, DropBlock) draw independently for each task (randomness="different"), as the loop
  does, though not the same numbers. Refused: networks with buffers outside batch norm, which a layer may update
  in place (DropBlock's ramp counter) and which vmap would update once for the whole meta-batch instead of once
  per task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from kshot.learners.vmap_batchnorm import VmapBatchNorm

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None],
             lrs: float | Mapping[str, Tensor]) -> Params:
    """One SGD step p - lr * g (lr a float, or a tensor per parameter for Meta-SGD); None grads mean zero."""
    updated = {}
    for name, value in params.items():
        grad = grads[name]
        if grad is None:
            updated[name] = value
            continue
        lr = lrs if isinstance(lrs, float | int) else lrs[name]
        updated[name] = value - lr * grad
    return updated


def inner_loop(call: Callable[[Params, Tensor], Tensor], params: Params, support_x: Tensor, support_y: Tensor,
               criterion: LossFn, steps: int, lrs: float | Mapping[str, Tensor], create_graph: bool) -> Params:
    """Adapt `params` by `steps` SGD steps on the support loss, with autograd (for the "loop" strategy).

    create_graph=True keeps the graph of each step (second-order MAML); False detaches the inner gradients,
    which gives exactly the first-order approximation (the outer gradient is the query gradient at the
    adapted parameters, plus the learning-rate gradients of Meta-SGD).
    """
    names = list(params)
    for _ in range(steps):
        loss = criterion(call(params, support_x), support_y)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph,
                                    allow_unused=True)
        params = sgd_step(params, dict(zip(names, grads)), lrs)
    return params


def func_inner_loop(call: Callable[[Params, Tensor], Tensor], params: Params, support_x: Tensor,
                    support_y: Tensor, criterion: LossFn, steps: int, lrs: float | Mapping[str, Tensor],
                    first_order: bool, stats: VmapBatchNorm | None = None) -> Params:
    """The same adaptation written with `torch.func.grad`, so it can run under `torch.func.vmap`. `stats`: the
    network's batch-norm layers when it has any (the statistics they record leave each grad as its aux output)."""

    def support_loss(p: Params) -> Tensor:
        return criterion(call(p, support_x), support_y)

    grad = torch.func.grad(stats.scoped(support_loss), has_aux=True) if stats else None
    for _ in range(steps):
        if stats:
            grads, recorded = grad(params)
            stats.extend(recorded)
        else:
            grads = torch.func.grad(support_loss)(params)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        params = sgd_step(params, grads, lrs)
    return params


def has_layers(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(m, kinds) for m in module.modules())


def buffers_outside_batch_norm(module: nn.Module) -> list[str]:
    """Names of the buffers of `module` that do not belong to a batch-norm layer."""
    return [f"{name}.{buffer}" if name else buffer for name, m in module.named_modules()
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) for buffer, _ in m.named_buffers(recurse=False)]


def pick_strategy(module: nn.Module, requested: str, device: torch.device) -> str:
    """The task strategy to use: `requested` if not "auto"; else "loop" for networks with convolutions
    (grouped convolutions under vmap were slower on CPU) and "vmap" for the rest (fully connected networks, where
    batched matrix products pay). "vmap" is refused for a network with buffers outside batch norm."""
    if requested not in ("auto", "loop", "vmap"):
        raise ValueError(f"unknown strategy {requested!r}; choose auto, loop or vmap")
    others = buffers_outside_batch_norm(module)
    if requested == "vmap" and others:
        raise ValueError(f"strategy 'vmap' needs a network whose only buffers are batch norm's, but it has "
                         f"{', '.join(others)} (a layer may update them in place, which vmap would do once for all "
                         f"tasks instead of once per task, as DropBlock's ramp counter is); use strategy 'loop'")
    if requested != "auto":
        return requested
    del device  # the same rule on CPU and CUDA for now; only CPU was measured (see module docstring)
    return "loop" if others or has_layers(module, (nn.modules.conv._ConvNd,)) else "vmap"
