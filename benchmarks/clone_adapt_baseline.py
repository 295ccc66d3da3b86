"""The per-task clone/adapt MAML of learn2learn, rewritten here (no dependency on learn2learn) as the baseline
of benchmarks/maml_speed.py: each task clones the whole module, takes differentiable SGD steps by writing the
updated tensors into the clone's parameter slots, and backpropagates its query loss straight away."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kshot.episode import Episode


def clone_module(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose parameters are differentiable clones (learn2learn's clone_module)."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {name: (p.clone() if p is not None else None) for name, p in module._parameters.items()}
    clone._buffers = {name: (b.clone() if b is not None and b.requires_grad else b)
                      for name, b in module._buffers.items()}
    clone._modules = {name: (clone_module(child) if child is not None else None)
                      for name, child in module._modules.items()}
    return clone


def update_module(module: nn.Module, updates: dict[str, Tensor], prefix: str = "") -> None:
    """Write p - lr * g tensors into the parameter slots of a clone, recursively (learn2learn's update_module)."""
    for name in list(module._parameters):
        key = prefix + name
        if key in updates:
            module._parameters[name] = updates[key]
    for name, child in module._modules.items():
        if child is not None:
            update_module(child, updates, prefix + name + ".")


def adapt(clone: nn.Module, loss: Tensor, lr: float, first_order: bool = False) -> None:
    """One differentiable SGD step of a clone on `loss` (learn2learn's MAML.adapt)."""
    named = _named_tensors(clone)
    grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=not first_order, allow_unused=True)
    update_module(clone, {n: p - lr * g for (n, p), g in zip(named, grads, strict=True) if g is not None})


def _named_tensors(module: nn.Module, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Parameter slots of a clone by dotted name (they hold plain tensors, so named_parameters misses them)."""
    found = [(prefix + n, p) for n, p in module._parameters.items() if p is not None]
    for name, child in module._modules.items():
        if child is not None:
            found += _named_tensors(child, prefix + name + ".")
    return found


def meta_batch_backward(model: nn.Module, batch: Episode, steps: int, lr: float, first_order: bool = False
                        ) -> float:
    """learn2learn's training loop body: per task clone, adapt, query loss / tasks, backward; returns the loss."""
    total = 0.0
    for task in batch:
        clone = clone_module(model)
        for _ in range(steps):
            adapt(clone, F.cross_entropy(clone(task.support_x), task.support_y), lr, first_order)
        loss = F.cross_entropy(clone(task.query_x), task.query_y) / batch.batch_size
        loss.backward()
        total += loss.item()
    return total
