"""Supervised pretraining over all base classes, shared by Baseline, Baseline++ and SimpleShot: a
classifier head sized from the training set in `prepare`, trained by cross-entropy on labelled batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT
from kshot.data.dataset import ClassDataset
from kshot.data.supervised import SupervisedStream
from kshot.learners.base import EpisodeShape, Learner, accuracy
from kshot.learners.options import PositiveCount, feature_dim


def chen_scale(classes: int) -> float:
    """The cosine classifier's scale in Chen et al.'s code: 2 for up to 200 classes, 10 beyond."""
    return 2.0 if classes <= 200 else 10.0


class CosineClassifier(nn.Module):
    """Baseline++'s head: logits = scale * cos(feature, w_c), one weight vector w_c per class, no bias."""

    def __init__(self, in_features: int, classes: int, scale: float, generator: torch.Generator | None = None
                 ) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter((torch.rand(classes, in_features, generator=generator) * 2 - 1) * bound)
        self.scale = scale

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * F.normalize(features, dim=-1, eps=1e-5) @ F.normalize(self.weight, dim=-1).t()


def linear_head(in_features: int, classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """A linear classifier initialised as nn.Linear is, but from `generator` (same seed, same head)."""
    head = nn.Linear(in_features, classes)
    bound = 1 / math.sqrt(in_features)
    with torch.no_grad():
        head.weight.copy_((torch.rand(classes, in_features, generator=generator) * 2 - 1) * bound)
        head.bias.copy_((torch.rand(classes, generator=generator) * 2 - 1) * bound)
    return head


class SupervisedLearner(Learner):
    """A learner pretrained as a classifier over every base class; subclasses choose the head and `adapt`."""

    trains_on_episodes = False  # trains on labelled batches over all base classes

    @dataclass(config=STRICT)
    class Options:
        """batch_size: examples per pretraining step; num_classes: of the pretraining head, None until
        `prepare` sets it from the training set (an option, so that a saved learner is rebuilt with its head)."""

        batch_size: PositiveCount = 128
        num_classes: PositiveCount | None = None

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        self.feature_dim = feature_dim(backbone, self.image_shape)
        self.classifier: nn.Module | None = None
        if self.options["num_classes"] is not None:
            self.classifier = self.make_classifier(int(self.options["num_classes"]))

    def make_classifier(self, classes: int) -> nn.Module:
        """The pretraining head over `classes` base classes (linear unless a subclass says otherwise)."""
        return linear_head(self.feature_dim, classes, torch.Generator().manual_seed(0))

    def prepare(self, train_dataset: ClassDataset) -> None:
        """Size the classifier head from the training set's class count (rotations included) and record it."""
        classes = train_dataset.num_classes
        if self.classifier is not None:
            if int(self.options["num_classes"]) != classes:
                raise ValueError(f"this {self.name} learner has a head over {self.options['num_classes']} "
                                 f"classes but {train_dataset.name} has {classes}; train a new learner")
            return
        self.options["num_classes"] = classes
        device = next(self.backbone.parameters()).device
        self.classifier = self.make_classifier(classes).to(device)

    def training_stream(self, dataset: ClassDataset, shape: EpisodeShape, seed: int) -> Iterator[Any]:
        """Plain supervised batches over all base classes (the episode shape is not used)."""
        return SupervisedStream(dataset, int(self.options["batch_size"]), seed=seed)

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if self.classifier is None:
            raise RuntimeError(f"{self.name} has no classifier head yet: call prepare(train_dataset) first")
        images, labels = batch
        features = self.backbone(images)
        self.observe_features(features.detach())
        logits = self.classifier(features)
        return F.cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    def observe_features(self, features: Tensor) -> None:
        """Hook for learners that keep statistics of the base-class features (SimpleShot's mean)."""
