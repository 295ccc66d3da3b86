"""Prototypical Networks (Snell, Swersky and Zemel, 2017): classify queries by squared Euclidean distance to
class prototypes, the mean embedding of each class's support examples."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import class_means, embed_episode, squared_euclidean


class ProtoNet(Learner):
    """Prototypical Networks with squared Euclidean distance, as in the paper."""

    name = "protonet"
    works_on_features = True

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support, query = embed_episode(self.backbone, batch)
        logits = -squared_euclidean(query, class_means(support, batch.support_y, batch.ways))
        logits, labels = logits.reshape(-1, batch.ways), batch.query_y.reshape(-1)
        return F.cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        prototypes = class_means(support, support_y, classes_in(support_y))
        return lambda query: -squared_euclidean(query, prototypes)
