"""What the gradient-based learners (MAML, ANIL, Meta-SGD, Reptile) share: a network made of the backbone and
a linear head of `ways` outputs (or the backbone alone for regression), its loss, validated options, and a
training stream that also takes task families such as the sinusoids."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT
from kshot.episode import Episode
from kshot.learners.base import EpisodeShape, Learner, accuracy, classes_in
from kshot.learners.functional import Params
from kshot.learners.options import PositiveCount, feature_dim


class FunctionalLearner(Learner):
    """Base of the gradient-based learners; subclasses extend `Options` and define `loss` and `adapt`."""

    @dataclass(config=STRICT)
    class Options:
        """ways: outputs of the linear head (classification); task: classification (a linear head of `ways`
        outputs on the backbone, cross-entropy) or regression (the backbone alone, mean squared error)."""

        ways: PositiveCount = 5
        task: Literal["classification", "regression"] = "classification"

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        ways = self.options["ways"]
        self.head = nn.Linear(feature_dim(backbone, image_shape), ways) if not self.regression else None

    # --------------------------------------------------------------------------------------------- network
    @property
    def regression(self) -> bool:
        return self.options["task"] == "regression"

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        return self.head(out) if self.head is not None else out

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy for classification, mean squared error for regression."""
        return F.mse_loss(output, target) if self.regression else F.cross_entropy(output, target)

    def network_params(self) -> Params:
        """The network's parameters by name (backbone and head), as `functional_call` on self expects them."""
        return {n: p for n, p in self.named_parameters() if n.startswith(("backbone.", "head."))}

    def call(self, params: Params, x: Tensor) -> Tensor:
        """The network applied to `x` with `params` in place of its own parameters."""
        return torch.func.functional_call(self, params, (x,))

    # --------------------------------------------------------------------------------------------- checks
    def check_episode(self, batch: Any) -> Episode:
        """`batch` as a meta-batch Episode (a single episode gets a leading dimension of 1), checked."""
        if not isinstance(batch, Episode):
            raise TypeError(f"{self.name} trains on Episode batches, got {type(batch).__name__}")
        if not self.regression and batch.ways != self.options["ways"]:
            raise ValueError(f"{self.name} has a {self.options['ways']}-way head but got a {batch.ways}-way "
                             f"episode; set options.ways to {batch.ways} or train on {self.options['ways']}-way "
                             f"episodes")
        if batch.is_batched:
            return batch
        return Episode(*(t.unsqueeze(0) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                                                   batch.classes)))

    def check_support(self, support_y: Tensor) -> None:
        """Raise a clear error when a test support set does not fit the head."""
        if self.regression:
            return
        ways = classes_in(support_y)
        if ways != self.options["ways"]:
            raise ValueError(f"{self.name} has a {self.options['ways']}-way head but the support set has {ways} "
                             f"classes; evaluate on {self.options['ways']}-way episodes or retrain with ways={ways}")

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """Query accuracy (classification) or mean squared error (regression) of detached outputs."""
        if self.regression:
            return {"mse": F.mse_loss(outputs, targets).item()}
        return {"accuracy": accuracy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))}

    # ----------------------------------------------------------------------------------------- training
    def training_stream(self, dataset: Any, shape: EpisodeShape, seed: int) -> Iterator[Any]:
        """Episodes of a ClassDataset, or the tasks of a task family with a `stream(shape, seed)` method
        (e.g. `kshot.data.sinusoid.SinusoidTasks`), so the Trainer runs regression unchanged."""
        if hasattr(dataset, "stream"):
            return dataset.stream(shape, seed)
        return super().training_stream(dataset, shape, seed)


def surrogate_loss(value: Tensor, params: list[Tensor], grads: list[Tensor | None]) -> Tensor:
    """A scalar equal to `value` whose gradient w.r.t. `params` is `grads` (already computed elsewhere), so a
    learner that computed its own gradients still hands the trainer an ordinary loss to backpropagate."""
    inner = sum((p * g.detach()).sum() for p, g in zip(params, grads) if g is not None)
    if not isinstance(inner, Tensor):
        return value.detach()
    return value.detach() + inner - inner.detach()


TaskFn = Callable[[nn.Module, int], tuple[Tensor, Tensor]]
"""(module, task index) -> (task loss, task outputs), computed with that module's submodules and parameters."""


def per_task_gradients(module: nn.Module, indices: Iterable[int], tasks: int, task_fn: TaskFn
                       ) -> tuple[list[Tensor | None], list[Tensor], list[Tensor]]:
    """Backpropagate each task of `indices` as soon as its loss is known (one task's graph alive at a time):
    the summed gradients of loss / tasks with respect to module's trainable parameters (None where unused),
    and each task's detached loss and outputs. The sum is accumulated in place (in a copy of the first gradient
    that reaches each parameter: autograd.grad may return views, e.g. an expanded one for a summed parameter)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    grads: list[Tensor | None] = [None] * len(trainable)
    losses, outputs = [], []
    for index in indices:
        loss, out = task_fn(module, index)
        scale = torch.full_like(loss, 1 / tasks)  # d(loss / tasks), without a division node in the graph
        more = torch.autograd.grad(loss, trainable, grad_outputs=scale, allow_unused=True)
        grads = [a if b is None else b.clone(memory_format=torch.contiguous_format) if a is None else a.add_(b)
                 for a, b in zip(grads, more, strict=True)]
        losses.append(loss.detach())
        outputs.append(out.detach())
    return grads, losses, outputs


def add_gradients(total: Sequence[Tensor | None], more: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Element-wise sum of two gradient lists in which None stands for zero."""
    return [a if b is None else (b if a is None else a + b) for a, b in zip(total, more, strict=True)]
