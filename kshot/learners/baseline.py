"""Baseline and Baseline++ (Chen, Liu, Kira, Wang and Huang, 2019): pretrain a linear (Baseline) or cosine
(Baseline++) classifier over all base classes; for a new task, freeze the backbone and fit a new head of the
same kind on the support features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kshot.learners.base import Predictor, classes_in
from kshot.learners.supervised import CosineClassifier, SupervisedLearner, chen_scale, linear_head


def fit_head(head: nn.Module, features: Tensor, labels: Tensor, steps: int, lr: float) -> nn.Module:
    """Train `head` on fixed features by full-batch SGD as in Chen et al.'s code (momentum 0.9, dampening 0.9,
    weight decay 1e-3); full batches keep the result independent of the order of the support set."""
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head


class Baseline(SupervisedLearner):
    """Baseline: linear classifier pretraining, a new linear head fitted on the support set.

    Options: batch_size, num_classes (set by prepare), adapt_steps and adapt_lr (of the new head's SGD)."""

    name = "baseline"
    defaults: dict[str, Any] = {**SupervisedLearner.defaults, "adapt_steps": 100, "adapt_lr": 0.1}

    def new_head(self, ways: int) -> nn.Module:
        """The head fitted to a task: the same initial weights for the same N, so results are repeatable."""
        return linear_head(self.feature_dim, ways, torch.Generator().manual_seed(0))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        ways = classes_in(support_y)
        with torch.no_grad():
            features = self.backbone(support_x)
        head = self.new_head(ways).to(features.device)
        fit_head(head, features, support_y, int(self.options["adapt_steps"]), float(self.options["adapt_lr"]))
        head.requires_grad_(False)

        def predict(query_x: Tensor) -> Tensor:
            return head(self.backbone(query_x))

        return predict


class BaselinePlusPlus(Baseline):
    """Baseline++: the same with cosine classifiers (scale: a number, or null for Chen's 2 up to 200 classes
    and 10 beyond), which reduces intra-class variation of the features."""

    name = "baseline++"
    defaults: dict[str, Any] = {**Baseline.defaults, "scale": None}

    def head_scale(self, classes: int) -> float:
        scale = self.options["scale"]
        return float(scale) if scale is not None else chen_scale(classes)

    def make_classifier(self, classes: int) -> nn.Module:
        generator = torch.Generator().manual_seed(0)
        return CosineClassifier(self.feature_dim, classes, self.head_scale(classes), generator)

    def new_head(self, ways: int) -> nn.Module:
        generator = torch.Generator().manual_seed(0)
        return CosineClassifier(self.feature_dim, ways, self.head_scale(ways), generator)
