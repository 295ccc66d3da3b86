"""Batch norm under `torch.func.vmap` over the tasks of a meta-batch: correct second-order gradients, and running
statistics updated exactly as the per-task loop updates them.

Two things stop a batch-norm layer from running as is in MAML's vmapped inner loop:
- in training mode it updates its running statistics in place, and under vmap its input is batched over tasks but
  those buffers are not, so the update is refused. `torch.func.replace_all_batch_norm_modules_` avoids it by
  deleting the running statistics from the module for good, which would lose what inference-mode evaluation and
  checkpoints need;
- its fused kernel's backward has a wrong batching rule for the gradient with respect to the input (PyTorch's
  functorch issue #534, still so in torch 2.13): the first-order meta-gradient is right but second-order MAML's,
  which differentiates that backward, is not (measured on a 2-block Conv-4: 0.004 to 0.25 off the loop's).

`VmapBatchNorm.active()` therefore, while the vmapped computation runs, gives every batch-norm layer a decomposed
forward pass (batch mean and variance by `torch.var_mean`, then x * scale + shift: primitive operations whose
batching and double-backward rules are right) that normalises with the batch statistics in training mode, as the
fused kernel does, and updates nothing; it records each training-mode call's batch mean and unbiased variance
(detached). The recorded statistics leave the torch.func transforms as ordinary outputs ([tasks, channels] per
call), and `apply` then replays the updates the loop would have made, task after task and call after call within
a task (inner steps, then the query pass), with the layer's own momentum (or cumulative average when momentum is
None) and counter: the final running statistics equal the loop's up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

BatchNorm = nn.modules.batchnorm._BatchNorm


class VmapBatchNorm:
    """The batch-norm layers of a module made fit for vmap over tasks (see the module docstring).

    Use: `with vmap_bn.active():` around the vmap; inside every torch.func.grad, differentiate `scoped(f)` with
    has_aux=True and hand its aux to `extend`; vmap `scoped(task)` too, and give its second output to `apply`.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, BatchNorm)]
        self.order: list[int] = []
        """Index into `layers` of every recorded call, in call order (the same for every task: vmap traces the
        per-task function once for all tasks)."""
        self.pending: list[Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.layers)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Every layer runs the decomposed forward; running statistics are used in eval mode, neither used nor
        updated in training mode, where the batch statistics are recorded instead."""
        self.order, self.pending = [], []
        saved = [layer.__dict__.get("forward") for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer.forward = self._forward(index, layer)
        try:
            yield
        finally:
            for layer, forward in zip(self.layers, saved, strict=True):
                del layer.forward
                if forward is not None:
                    layer.forward = forward

    def _forward(self, index: int, layer: BatchNorm) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            layer._check_input_dim(x)
            shape = [1, -1] + [1] * (x.dim() - 2)
            if layer.training or layer.running_mean is None:
                dims = [d for d in range(x.dim()) if d != 1]
                var, mean = torch.var_mean(x, dim=dims, correction=0)
                if layer.training and layer.track_running_stats and layer.running_mean is not None:
                    count = x.numel() // x.shape[1]
                    self.order.append(index)
                    self.pending += [mean.detach(), var.detach() * (count / max(count - 1, 1))]
            else:
                mean, var = layer.running_mean, layer.running_var
            scale = torch.rsqrt(var + layer.eps)
            if layer.weight is not None:
                scale = scale * layer.weight
            shift = -mean * scale
            if layer.bias is not None:
                shift = shift + layer.bias
            return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))

        return forward

    def scoped(self, fn: Callable[..., Any]) -> Callable[..., tuple[Any, list[Tensor]]]:
        """`fn` returning (its output, the statistics recorded while it ran), so that they leave a torch.func
        transform as an output (grad's aux, vmap's output) instead of escaping it."""
        def run(*args: Any) -> tuple[Any, list[Tensor]]:
            outer, self.pending = self.pending, []
            try:
                return fn(*args), self.pending
            finally:
                self.pending = outer

        return run

    def extend(self, recorded: list[Tensor]) -> None:
        """Statistics returned by a `scoped` function, kept in call order at the caller's level."""
        self.pending += recorded

    def apply(self, recorded: list[Tensor]) -> None:
        """Update the running statistics from the vmapped statistics ([tasks, channels] means and unbiased
        variances in call order), as the loop over tasks would have: tasks in order, each task's calls in order."""
        if len(recorded) != 2 * len(self.order):
            raise RuntimeError(f"got {len(recorded) // 2} batch-norm calls' statistics for {len(self.order)} calls")
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                calls = [c for c, i in enumerate(self.order) if i == index]
                if calls:  # [tasks, calls, C] -> one row per update in the loop's order: task-major
                    means = torch.stack([recorded[2 * c] for c in calls], 1).flatten(0, 1)
                    variances = torch.stack([recorded[2 * c + 1] for c in calls], 1).flatten(0, 1)
                    replay_updates(layer, means, variances)


def replay_updates(layer: BatchNorm, means: Tensor, variances: Tensor) -> None:
    """Apply len(means) successive training-mode updates of `layer`'s running statistics, as F.batch_norm makes
    one on each call (r <- (1 - f) r + f s, with f the momentum, or 1 / calls so far when momentum is None), in
    closed form: with momentum m, r_n = (1 - m)^n r_0 + sum_k m (1 - m)^(n - 1 - k) s_k; with None,
    r_n = (c r_0 + sum_k s_k) / (c + n), c the counter before the updates."""
    updates = means.shape[0]
    mean, var, counter = layer.running_mean, layer.running_var, layer.num_batches_tracked
    if layer.momentum is None:
        before = int(counter) if counter is not None else 0
        mean.copy_((before * mean + means.sum(0).to(mean.dtype)) / (before + updates))
        var.copy_((before * var + variances.sum(0).to(var.dtype)) / (before + updates))
    else:
        m = float(layer.momentum)
        powers = torch.arange(updates - 1, -1, -1, dtype=torch.float64, device=mean.device)
        weights = (m * (1 - m) ** powers).to(mean.dtype)
        mean.copy_((1 - m) ** updates * mean + weights @ means.to(mean.dtype))
        var.copy_((1 - m) ** updates * var + weights @ variances.to(var.dtype))
    if counter is not None:
        counter.add_(updates)
