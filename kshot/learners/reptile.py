"""Reptile (Nichol, Achiam and Schulman, 2018): train on each task's support set with a few SGD or Adam steps,
then move the initialisation toward the adapted weights.

The outer step goes through the shared trainer: `loss` returns the surrogate
0.5 * ||theta - stopgrad(theta_adapted)||^2 summed over parameters and averaged over tasks, whose gradient is
theta - mean(theta_adapted); plain SGD with learning rate epsilon (momentum 0) on it is the Reptile update
theta <- theta + epsilon * (mean(theta_adapted) - theta).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kshot.episode import Episode
from kshot.learners.base import Predictor
from kshot.learners.functional import Params
from kshot.learners.gradient import FunctionalLearner, check_int_options

INNER_OPTIMIZERS = ("sgd", "adam")


class Reptile(FunctionalLearner):
    """Reptile with an SGD or Adam inner loop (the paper's code uses Adam with beta1 = 0) on the support set.

    inner_batch_size (and test_inner_batch_size): each inner step sees that many support examples, taken in
    reshuffled passes over the support set as in the paper's code; None (the default) uses all of it each step.
    """

    name = "reptile"
    outer_optimizer: ClassVar[dict[str, Any]] = {"optimizer": "sgd", "momentum": 0.0}
    required_outer_optimizer: ClassVar[dict[str, Any]] = {"optimizer": "sgd", "momentum": 0.0}
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "ways": 5, "task": "classification", "inner_steps": 5, "inner_lr": 0.001, "inner_optimizer": "adam",
        "test_inner_steps": 50, "test_inner_lr": None,
        "inner_batch_size": None, "test_inner_batch_size": None}

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        if self.options["inner_optimizer"] not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got "
                             f"{self.options['inner_optimizer']!r}")
        check_int_options(self.options, ["inner_steps", "test_inner_steps"], 0)
        check_int_options(self.options, ["inner_batch_size", "test_inner_batch_size"], 1,
                          none_means="the whole support set")

    @staticmethod
    def mini_batches(examples: int, batch_size: int | None, steps: int, device: torch.device) -> list[Tensor | None]:
        """Index tensors for `steps` inner steps: consecutive chunks of reshuffled passes over `examples`
        (a chunk may span two passes); None (all examples) when batch_size is None or covers them all."""
        if batch_size is None or batch_size >= examples:
            return [None] * steps
        passes = -(-steps * batch_size // examples)
        order = torch.cat([torch.randperm(examples) for _ in range(passes)]).to(device)
        return list(order[: steps * batch_size].view(steps, batch_size))

    def fit(self, x: Tensor, y: Tensor, steps: int, lr: float, batch_size: int | None = None) -> Params:
        """Detached copies of the network's parameters after `steps` inner optimiser steps on (x, y), each on
        a mini-batch of `batch_size` examples (all of them if None)."""
        params = {n: p.detach().clone().requires_grad_() for n, p in self.network_params().items()}
        values = list(params.values())
        if self.options["inner_optimizer"] == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(values, lr=lr, betas=(0.0, 0.999))
        else:
            optimizer = torch.optim.SGD(values, lr=lr)
        with torch.enable_grad():
            for index in self.mini_batches(x.shape[0], batch_size, steps, x.device):
                bx, by = (x, y) if index is None else (x[index], y[index])
                loss = self.criterion(self.call(params, bx), by)
                for value, grad in zip(values, torch.autograd.grad(loss, values, allow_unused=True)):
                    value.grad = grad
                optimizer.step()
        return {n: p.detach() for n, p in params.items()}

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        """The Reptile surrogate (see the module docstring); metrics are the adapted query scores."""
        batch = self.check_episode(batch)
        theta = self.network_params()
        total: Tensor | float = 0.0
        outputs = []
        for sx, sy, qx in zip(batch.support_x, batch.support_y, batch.query_x):
            adapted = self.fit(sx, sy, self.options["inner_steps"], float(self.options["inner_lr"]),
                               self.options["inner_batch_size"])
            total = total + 0.5 * sum(((theta[n] - adapted[n]) ** 2).sum() for n in theta)
            if qx.shape[0]:
                with torch.no_grad():
                    outputs.append(self.call(adapted, qx))
        metrics = self.metrics(torch.stack(outputs), batch.query_y) if outputs else {}
        return total / batch.batch_size, metrics

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """Fine-tune a copy of the weights on the support set with the inner optimiser (works in no_grad)."""
        self.check_support(support_y)
        lr = self.options["test_inner_lr"]
        adapted = self.fit(support_x, support_y, self.options["test_inner_steps"],
                           float(lr if lr is not None else self.options["inner_lr"]),
                           self.options["test_inner_batch_size"])

        def predict(query_x: Tensor) -> Tensor:
            return self.call(adapted, query_x)

        return predict
