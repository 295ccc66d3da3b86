"""Baseline and Baseline++ (Chen, Liu, Kira, Wang and Huang, 2019): pretrain a linear (Baseline) or cosine
(Baseline++) classifier over all base classes; for a new task, freeze the backbone and fit a new head of the
same kind on the support features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, PositiveFloat
from kshot.learners.base import Predictor, classes_in
from kshot.learners.metric import canonical_order
from kshot.learners.options import PositiveCount
from kshot.learners.supervised import CosineClassifier, SupervisedLearner, chen_scale, linear_head


def fit_head(head: nn.Module, features: Tensor, labels: Tensor, epochs: int, lr: float, batch_size: int | None,
             seed: int) -> nn.Module:
    """Train `head` on fixed support features as Chen et al.'s code does (set_forward_adaptation: SGD with
    momentum 0.9, dampening 0.9, weight decay 1e-3): `epochs` passes over a random permutation of the support
    set in mini-batches of `batch_size` (the last one may be smaller; None: one full batch per pass).

    The permutations come from a generator seeded with `seed` on every call, and are drawn over the support
    set in a canonical order (by label, then feature content), so that the same support set, given in any
    order, always gives the same head: evaluation is repeatable and order-blind."""
    order = canonical_order(features, labels)
    features, labels = features[order], labels[order]
    examples = len(labels)
    size = examples if batch_size is None else min(batch_size, examples)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            if size < examples:
                permutation = torch.randperm(examples, generator=generator).to(features.device)
                shuffled_x, shuffled_y = features[permutation], labels[permutation]
            else:
                shuffled_x, shuffled_y = features, labels
            for start in range(0, examples, size):
                loss = F.cross_entropy(head(shuffled_x[start:start + size]), shuffled_y[start:start + size])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return head


class Baseline(SupervisedLearner):
    """Baseline: linear classifier pretraining, a new linear head fitted on the support set (`fit_head`)."""

    name = "baseline"
    works_on_features = True

    @dataclass(config=STRICT)
    class Options(SupervisedLearner.Options):
        """SupervisedLearner's, and how a task's new head is fitted, by default as in Chen et al.'s code (SGD
        at lr 0.01 for 100 epochs of mini-batches of 4): adapt_epochs: passes over the support set; adapt_lr:
        the SGD learning rate; adapt_batch_size: support examples per SGD step, None for the whole support set
        (one step per epoch); adapt_seed: seeds the mini-batch order afresh on every `adapt` call."""

        adapt_epochs: PositiveCount = 100
        adapt_lr: PositiveFloat = 0.01
        adapt_batch_size: PositiveCount | None = 4
        adapt_seed: int = 0

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        if "adapt_steps" in options:  # saved before adapt_epochs: that many full-batch steps, exactly as then
            options["adapt_epochs"] = options.pop("adapt_steps")
            options.setdefault("adapt_batch_size", None)
        super().__init__(backbone, image_shape, **options)

    def new_head(self, ways: int) -> nn.Module:
        """The head fitted to a task: the same initial weights for the same N, so results are repeatable."""
        return linear_head(self.feature_dim, ways, torch.Generator().manual_seed(0))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        """Fit a new head on the support features (fixed: no gradient reaches the backbone); the head maps query
        features to logits. Deterministic: the same support set, in any order, gives the same head."""
        features = support.detach()
        head = self.new_head(classes_in(support_y)).to(features.device)
        fit_head(head, features, support_y, self.options["adapt_epochs"], self.options["adapt_lr"],
                 self.options["adapt_batch_size"], self.options["adapt_seed"])
        return head.requires_grad_(False)


class BaselinePlusPlus(Baseline):
    """Baseline++: the same with cosine classifiers (scale: a number, or null for Chen's 2 up to 200 classes
    and 10 beyond), which reduces intra-class variation of the features."""

    name = "baseline++"

    @dataclass(config=STRICT)
    class Options(Baseline.Options):
        """Baseline's, and scale: of the cosine heads; None for Chen's 2 up to 200 classes, 10 beyond."""

        scale: PositiveFloat | None = None

    def head_scale(self, classes: int) -> float:
        scale = self.options["scale"]
        return float(scale) if scale is not None else chen_scale(classes)

    def make_classifier(self, classes: int) -> nn.Module:
        generator = torch.Generator().manual_seed(0)
        return CosineClassifier(self.feature_dim, classes, self.head_scale(classes), generator)

    def new_head(self, ways: int) -> nn.Module:
        generator = torch.Generator().manual_seed(0)
        return CosineClassifier(self.feature_dim, ways, self.head_scale(ways), generator)
