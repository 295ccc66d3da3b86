"""Reptile (Nichol, Achiam and Schulman, 2018): train on each task's support set with a few SGD or Adam steps,
then move the initialisation toward the adapted weights.

The outer step goes through the shared trainer: `loss` returns the surrogate
0.5 * ||theta - stopgrad(theta_adapted)||^2 summed over parameters and averaged over tasks, whose gradient is
theta - mean(theta_adapted); plain SGD with learning rate epsilon (momentum 0) on it is the Reptile update
theta <- theta + epsilon * (mean(theta_adapted) - theta).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic.dataclasses import dataclass
from torch import Tensor

from kshot.config import STRICT, PositiveFloat
from kshot.episode import Episode
from kshot.learners.base import Predictor
from kshot.learners.functional import Params
from kshot.learners.gradient import FunctionalLearner
from kshot.learners.metric import canonical_order
from kshot.learners.options import Count, PositiveCount


class Reptile(FunctionalLearner):
    """Reptile with an SGD or Adam inner loop (the paper's code uses Adam with beta1 = 0) on the support set.

    Inner mini-batches are drawn from the global RNG in training (seeded by the trainer, saved with its
    checkpoints) but from a generator seeded with `test_seed` in `adapt`, so that the same support set always
    gives the same predictor and evaluating never moves the training's random stream.
    """

    name = "reptile"
    outer_optimizer: ClassVar[dict[str, Any]] = {"optimizer": "sgd", "momentum": 0.0}
    required_outer_optimizer: ClassVar[dict[str, Any]] = {"optimizer": "sgd", "momentum": 0.0}

    @dataclass(config=STRICT)
    class Options(FunctionalLearner.Options):
        """FunctionalLearner's, and inner_steps, inner_lr, inner_optimizer (sgd or adam): the inner loop in
        training; test_inner_steps, test_inner_lr: at test (test_inner_lr None: inner_lr); inner_batch_size,
        test_inner_batch_size: support examples per inner step, taken in reshuffled passes over the support
        set as in the paper's code, None for all of it each step; test_seed: seeds the test mini-batch order
        afresh on every `adapt` call."""

        inner_steps: Count = 5
        inner_lr: PositiveFloat = 0.001
        inner_optimizer: Literal["sgd", "adam"] = "adam"
        test_inner_steps: Count = 50
        test_inner_lr: PositiveFloat | None = None
        inner_batch_size: PositiveCount | None = None
        test_inner_batch_size: PositiveCount | None = None
        test_seed: int = 0

    @staticmethod
    def mini_batches(examples: int, batch_size: int | None, steps: int, device: torch.device,
                     generator: torch.Generator | None = None) -> list[Tensor | None]:
        """Index tensors for `steps` inner steps: consecutive chunks of reshuffled passes over `examples`
        (a chunk may span two passes), drawn from `generator` (the global RNG if None); None (all examples)
        when batch_size is None or covers them all."""
        if batch_size is None or batch_size >= examples:
            return [None] * steps
        passes = -(-steps * batch_size // examples)
        order = torch.cat([torch.randperm(examples, generator=generator) for _ in range(passes)]).to(device)
        return list(order[: steps * batch_size].view(steps, batch_size))

    def fit(self, x: Tensor, y: Tensor, steps: int, lr: float, batch_size: int | None = None,
            generator: torch.Generator | None = None) -> Params:
        """Detached copies of the network's parameters after `steps` inner optimiser steps on (x, y), each on
        a mini-batch of `batch_size` examples (all of them if None) drawn from `generator` (global RNG if None)."""
        params = {n: p.detach().clone().requires_grad_() for n, p in self.network_params().items()}
        values = list(params.values())
        if self.options["inner_optimizer"] == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(values, lr=lr, betas=(0.0, 0.999))
        else:
            optimizer = torch.optim.SGD(values, lr=lr)
        with torch.enable_grad():
            for index in self.mini_batches(x.shape[0], batch_size, steps, x.device, generator):
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
        """Fine-tune a copy of the weights on the support set with the inner optimiser (works in no_grad); the
        mini-batch order comes from a generator seeded with `test_seed` on every call, never the global RNG."""
        self.check_support(support_y)
        # Mini-batches are cut from the support set in a canonical order, so its given order does not matter.
        order = canonical_order(support_x.flatten(1), support_y)
        support_x, support_y = support_x[order], support_y[order]
        lr = self.options["test_inner_lr"]
        adapted = self.fit(support_x, support_y, self.options["test_inner_steps"],
                           float(lr if lr is not None else self.options["inner_lr"]),
                           self.options["test_inner_batch_size"],
                           torch.Generator().manual_seed(self.options["test_seed"]))

        def predict(query_x: Tensor) -> Tensor:
            return self.call(adapted, query_x)

        return predict
