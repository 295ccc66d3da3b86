"""SimpleShot (Wang, Chao, Weinberger and van der Maaten, 2019): supervised pretraining, then nearest class
centroid on features centred by the mean base-class feature and L2-normalised (CL2N)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT
from kshot.learners.base import Predictor, classes_in
from kshot.learners.metric import class_means, squared_euclidean
from kshot.learners.supervised import SupervisedLearner


class SimpleShot(SupervisedLearner):
    """SimpleShot (options: see `SimpleShot.Options`).

    The base-class mean feature is a buffer, updated during training as an exponential moving average of the
    batch means of the training features, so it is saved with the weights."""

    name = "simpleshot"
    works_on_features = True

    @dataclass(config=STRICT)
    class Options(SupervisedLearner.Options):
        """SupervisedLearner's, and normalize: cl2n, l2n or un (centred and L2-normalised, L2-normalised,
        unnormalised); mean_momentum: of the moving average of base-class features, in (0, 1]."""

        normalize: Literal["cl2n", "l2n", "un"] = "cl2n"
        mean_momentum: Annotated[float, Field(gt=0, le=1)] = 0.05

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("mean_updates", torch.zeros((), dtype=torch.long))

    def observe_features(self, features: Tensor) -> None:
        """Move the base-class mean feature towards this batch's mean (the first batch sets it)."""
        batch_mean = features.mean(0)
        if int(self.mean_updates) == 0:
            self.feature_mean.copy_(batch_mean)
        else:
            self.feature_mean.lerp_(batch_mean, float(self.options["mean_momentum"]))
        self.mean_updates += 1

    def transform(self, features: Tensor) -> Tensor:
        """The chosen normalisation of features [..., D]."""
        mode = self.options["normalize"]
        if mode == "cl2n":
            features = features - self.feature_mean
        return F.normalize(features, dim=-1) if mode in ("cl2n", "l2n") else features

    def embed(self, images: Tensor) -> Tensor:
        """Backbone features under the chosen normalisation: the transform acts on each feature alone, so it
        belongs to the embedding (and is applied once to a whole batch of episodes' images)."""
        return self.transform(self.backbone(images))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        centroids = class_means(support, support_y, classes_in(support_y))
        return lambda query: -squared_euclidean(query, centroids)
