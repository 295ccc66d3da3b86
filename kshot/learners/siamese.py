"""Siamese Networks (Koch, Zemel and Salakhutdinov, 2015): a twin embedding trained on same/different pairs;
an N-way K-shot query goes to the class whose support images it is most similar to (mean score over shots).

Two heads: "bce" (the paper's: sigmoid of a learned weighting of the L1 distance between embeddings, binary
cross-entropy) and "contrastive" (Hadsell et al. 2006: squared distance for same pairs, squared hinge on
margin - distance for different pairs; similarity is minus the Euclidean distance)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, PositiveFloat
from kshot.data.dataset import ClassDataset
from kshot.data.pairs import PairSampler
from kshot.learners.base import EpisodeShape, Learner, Predictor, classes_in
from kshot.learners.options import PositiveCount, feature_dim


class SiameseNet(Learner):
    """Siamese Networks (options: see `SiameseNet.Options`)."""

    name = "siamese"
    trains_on_episodes = False  # trains on batches of pairs
    works_on_features = True

    @dataclass(config=STRICT)
    class Options:
        """head: bce or contrastive (see the module docstring); batch_size: pairs per step, half of them
        same-class, so it must be even; margin: of the contrastive loss."""

        head: Literal["bce", "contrastive"] = "bce"
        batch_size: Annotated[PositiveCount, Field(multiple_of=2)] = 128
        margin: PositiveFloat = 1.0

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        self.head: nn.Linear | None = None
        if self.options["head"] == "bce":
            self.head = nn.Linear(feature_dim(backbone, self.image_shape), 1)

    def training_stream(self, dataset: ClassDataset, shape: EpisodeShape, seed: int) -> Iterator[Any]:
        """Balanced same/different pairs over the training classes (the episode shape is not used)."""
        return PairSampler(dataset, int(self.options["batch_size"]), seed=seed)

    def similarity(self, first: Tensor, second: Tensor) -> Tensor:
        """Similarity score of embeddings first [..., D] and second [..., D] (a logit for the bce head)."""
        if self.head is not None:
            return self.head((first - second).abs()).squeeze(-1)
        return -(first - second).pow(2).sum(-1).clamp_min(1e-12).sqrt()

    def loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        first, second, same = batch
        features = self.backbone(torch.cat([first, second]))  # one pass, shared BN batch
        score = self.similarity(features[: len(first)], features[len(first):])
        if self.head is not None:
            loss = F.binary_cross_entropy_with_logits(score, same)
            predicted_same = score > 0
        else:
            distance = -score
            margin = float(self.options["margin"])
            loss = (same * distance.pow(2) + (1 - same) * (margin - distance).clamp_min(0).pow(2)).mean() / 2
            predicted_same = distance < margin / 2
        return loss, {"pair_accuracy": 100 * (predicted_same == same.bool()).float().mean().item()}  # percent

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        one_hot = F.one_hot(support_y, classes_in(support_y)).to(support.dtype)
        one_hot = one_hot / one_hot.sum(0, keepdim=True)  # mean over each class's shots

        def predict(query: Tensor) -> Tensor:
            return self.similarity(query.unsqueeze(1), support.unsqueeze(0)) @ one_hot  # [Q, M] @ [M, N]

        return predict

