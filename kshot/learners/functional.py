"""Inner-loop machinery of the gradient-based learners: differentiable SGD steps on a parameter dict, run
through `torch.func.functional_call`, so any `nn.Module` can be adapted without copying or patching it.

Strategies over the tasks of a meta-batch (chosen by `pick_strategy`):
- "loop": a plain Python loop over tasks, one functional forward/grad per task. Measured on CPU this is the
  fastest for convolutional networks: under `vmap`, per-task weights turn every convolution into a grouped
  convolution, which was about 2x slower than the loop with 15 queries a class (see BENCHMARKS.md).
- "vmap": `torch.func.vmap` over tasks with `torch.func.grad` inside; per-task linear layers become batched
  matrix products, which pays for small fully connected networks (the sinusoid MLP). It needs a network
  without batch norm running statistics (in-place updates are not allowed under vmap).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

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
                    first_order: bool) -> Params:
    """The same adaptation written with `torch.func.grad`, so it can run under `torch.func.vmap`."""

    def support_loss(p: Params) -> Tensor:
        return criterion(call(p, support_x), support_y)

    for _ in range(steps):
        grads = torch.func.grad(support_loss)(params)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        params = sgd_step(params, grads, lrs)
    return params


def has_layers(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(m, kinds) for m in module.modules())


def pick_strategy(module: nn.Module, requested: str, device: torch.device) -> str:
    """The task strategy to use: `requested` if not "auto"; else "loop" for networks with convolutions or
    batch norm (grouped convolutions under vmap were slower on CPU; BN running stats cannot be updated under
    vmap) and "vmap" for the rest (fully connected networks, where batched matrix products pay)."""
    if requested not in ("auto", "loop", "vmap"):
        raise ValueError(f"unknown strategy {requested!r}; choose auto, loop or vmap")
    norm = has_layers(module, (nn.modules.batchnorm._BatchNorm,))
    if requested == "vmap" and norm:
        raise ValueError("strategy 'vmap' needs a network without batch norm (running statistics are updated "
                         "in place, which vmap does not allow); use strategy 'loop'")
    if requested != "auto":
        return requested
    del device  # the same rule on CPU and CUDA for now; only CPU was measured (see module docstring)
    return "loop" if norm or has_layers(module, (nn.modules.conv._ConvNd,)) else "vmap"
