"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr and Hospedales, 2018): a learned relation module scores
each (class, query) pair from their concatenated feature maps, trained by MSE against one-hot targets."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.backbones import conv_block
from kshot.config import STRICT
from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import embed_episode
from kshot.learners.options import PositiveCount, backbone_output_shape


class RelationModule(nn.Module):
    """Two conv blocks and two fully connected layers ending in a sigmoid: relation score in [0, 1]."""

    def __init__(self, map_shape: tuple[int, int, int], channels: int = 64, hidden: int = 8) -> None:
        super().__init__()
        in_channels, height, width = map_shape
        blocks = []
        for block_in in (2 * in_channels, channels):
            pool = min(height, width) >= 2
            blocks.append(conv_block(block_in, channels, pool))
            if pool:
                height, width = height // 2, width // 2
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Linear(channels * height * width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        """pairs [P, 2C, H, W] (class map concatenated with query map) -> scores [P]."""
        return torch.sigmoid(self.fc(self.blocks(pairs).flatten(1))).squeeze(-1)


def class_sums(maps: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Element-wise sum of each class's feature maps (the paper's K-shot class representation).

    maps [..., M, C, H, W], labels [..., M] -> [..., ways, C, H, W]."""
    one_hot = F.one_hot(labels, ways).to(maps.dtype)  # [..., M, N]
    summed = one_hot.transpose(-1, -2) @ maps.flatten(-3)
    return summed.reshape(*summed.shape[:-1], *maps.shape[-3:])


class RelationNet(Learner):
    """Relation Networks on a feature-map backbone (conv4 with flatten: false)."""

    name = "relation"
    works_on_features = True  # embed gives the backbone's feature maps [M, C, h, w]; the relation module scores them

    @dataclass(config=STRICT)
    class Options:
        """relation_channels and relation_hidden: the relation module's conv width and hidden FC size (64 and
        8 for Omniglot, as in the paper)."""

        relation_channels: PositiveCount = 64
        relation_hidden: PositiveCount = 8

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        map_shape = backbone_output_shape(backbone, self.image_shape)
        if len(map_shape) != 3:
            raise ValueError(f"Relation Networks need feature maps but the backbone gives shape {map_shape}; "
                             f"set flatten: false in the recipe's backbone "
                             f"(e.g. backbone: {{name: conv4, flatten: false}})")
        self.relation = RelationModule(map_shape, int(self.options["relation_channels"]),
                                       int(self.options["relation_hidden"]))

    def scores(self, support_maps: Tensor, support_y: Tensor, query_maps: Tensor, ways: int) -> Tensor:
        """Relation scores [..., Q, N] of every query with every class."""
        classes = class_sums(support_maps, support_y, ways)  # [..., N, C, H, W]
        queries = query_maps.shape[-4]
        lead = classes.shape[:-4]
        class_side = classes.unsqueeze(-5).expand(*lead, queries, *classes.shape[-4:])
        query_side = query_maps.unsqueeze(-4).expand(*lead, queries, ways, *query_maps.shape[-3:])
        pairs = torch.cat([class_side, query_side], dim=-3)  # [..., Q, N, 2C, H, W]
        return self.relation(pairs.reshape(-1, *pairs.shape[-3:])).reshape(*lead, queries, ways)

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support_maps, query_maps = embed_episode(self.backbone, batch)
        scores = self.scores(support_maps, batch.support_y, query_maps, batch.ways)
        scores, labels = scores.reshape(-1, batch.ways), batch.query_y.reshape(-1)
        loss = F.mse_loss(scores, F.one_hot(labels, batch.ways).to(scores.dtype))
        return loss, {"accuracy": accuracy(scores, labels)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        ways = classes_in(support_y)
        return lambda query: self.scores(support, support_y, query, ways)
