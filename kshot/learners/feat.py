"""FEAT (Ye, Hu, Zhan and Sha, CVPR 2020, "Few-Shot Learning via Embedding Adaptation with Set-to-Set
Functions"): class prototypes adapted to the task by a set-to-set function, a one-layer one-head transformer, then
ProtoNet-style classification of the (unadapted) query embeddings by distance to the adapted prototypes.

The transformer is the authors' `MultiHeadAttention(1, d, d, d, dropout=0.5)` (github.com/Sha-Lab/FEAT,
model/models/feat.py): queries, keys and values by bias-free linear maps (weights drawn from N(0, 1/d)), softmax
attention at temperature sqrt(d) with dropout 0.1 on the attention weights, an output linear map (Xavier-normal
weights) with dropout 0.5, a residual connection and layer norm: out = LayerNorm(x + Dropout(fc(attn(x)))). It is
permutation-equivariant, so it takes sets of any size: N prototypes for 1-shot and 5-shot tasks alike.

Logits are -|x_q - p_c|^2 / temperature (use_euclidean, the paper's choice) or x_q . p_c / |p_c| / temperature
(the code's other branch: only the prototype is normalised). Training adds the paper's contrastive regulariser,
weighted by `balance`: for each class, the transformer is applied to the set of its support and query embeddings,
and the centres of the adapted sets classify every one of those (unadapted) embeddings at `temperature2`.

Defaults are the authors' 5-way 1-shot ConvNet miniImageNet script (README, train_fsl.py): Euclidean distance,
temperature 64, temperature2 16, balance 1 (their 5-shot script: temperature 32, temperature2 64, balance 0.1;
ResNet-12 1-shot: 64, 64, 0.01). Their ConvNet max-pools its last 5x5 map to 64 features: `pool: max` does that
on a backbone that keeps feature maps (conv4 with flatten: false). They also start from a backbone pretrained on
the 64 training classes and train the transformer at 10 times the backbone's learning rate (`lr_mul`); kshot has
neither (one learning rate for all parameters; training starts from scratch), which recipes say."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, ConfigError, NonNegativeFloat, PositiveFloat
from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import class_means, embed_episode, squared_euclidean
from kshot.learners.options import backbone_output_shape

DropRate = Annotated[float, Field(ge=0, lt=1)]


class SetAttention(nn.Module):
    """FEAT's set-to-set function: one-head scaled dot-product self-attention over a set [..., S, D], with
    residual connection and layer norm (module docstring); equivariant to permutations of the set."""

    def __init__(self, dim: int, dropout: float = 0.5, attention_dropout: float = 0.1) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, mean=0, std=math.sqrt(2.0 / (dim + dim)))
        self.out = nn.Linear(dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.temperature = math.sqrt(dim)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.query(x) @ self.key(x).mT / self.temperature  # [..., S, S]
        attention = self.attention_dropout(scores.softmax(dim=-1))
        return self.norm(x + self.dropout(self.out(attention @ self.value(x))))


class FEAT(Learner):
    """FEAT: prototypes adapted by a transformer, then distance-based classification (options: `Options`)."""

    name = "feat"
    works_on_features = True

    @dataclass(config=STRICT)
    class Options:
        """temperature: divides the query logits; temperature2: divides the regulariser's logits; balance: weight
        of the contrastive regulariser (0 turns it off); use_euclidean: negative squared Euclidean distance, else
        the dot product with the L2-normalised prototype; dropout, attention_dropout: the transformer's (after its
        output map, on its attention weights); pool: global max / average pooling of the backbone's feature maps
        (none flattens them). Defaults: the authors' 5-way 1-shot ConvNet script (module docstring)."""

        temperature: PositiveFloat = 64.0
        temperature2: PositiveFloat = 16.0
        balance: NonNegativeFloat = 1.0
        use_euclidean: bool = True
        dropout: DropRate = 0.5
        attention_dropout: DropRate = 0.1
        pool: Literal["none", "max", "avg"] = "none"

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        shape = backbone_output_shape(backbone, self.image_shape)
        if self.options["pool"] != "none" and len(shape) != 3:
            raise ConfigError(f"options.pool: {self.options['pool']} pooling needs a backbone that gives feature "
                              f"maps [C, H, W], but it gives shape {list(shape)}; use e.g. conv4 with flatten: "
                              f"false, or pool: none")
        dim = shape[0] if self.options["pool"] != "none" else math.prod(shape)
        self.set_function = SetAttention(dim, self.options["dropout"], self.options["attention_dropout"])

    def embed(self, images: Tensor) -> Tensor:
        """Feature vectors [M, D]: the backbone's output, globally pooled or flattened as `pool` says."""
        return self.features(self.backbone(images))

    def features(self, output: Tensor) -> Tensor:
        """The backbone's output [M, ...] as feature vectors [M, D] (pooled or flattened)."""
        pool = self.options["pool"]
        if pool == "max":
            return output.amax(dim=(-2, -1))
        if pool == "avg":
            return output.mean(dim=(-2, -1))
        return output.flatten(1)

    def scores(self, features: Tensor, centres: Tensor, temperature: float) -> Tensor:
        """Logits [..., P, N] of features [..., P, D] against class centres [..., N, D]."""
        if self.options["use_euclidean"]:
            return -squared_euclidean(features, centres) / temperature
        return features @ F.normalize(centres, dim=-1).mT / temperature

    def adapted_prototypes(self, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """Class means of support features [..., M, D] (labels [..., M]) adapted by the set function: [..., N, D]."""
        return self.set_function(class_means(support, support_y, ways))

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support, query = embed_episode(self.backbone, batch)
        lead = batch.support_y.dim()
        support, query = (self.features(x.flatten(0, lead - 1)).unflatten(0, x.shape[:lead])
                          for x in (support, query))
        prototypes = self.adapted_prototypes(support, batch.support_y, batch.ways)
        logits = self.scores(query, prototypes, self.options["temperature"]).reshape(-1, batch.ways)
        labels = batch.query_y.reshape(-1)
        loss = F.cross_entropy(logits, labels)
        if self.options["balance"] > 0:
            loss = loss + self.options["balance"] * self.contrastive_loss(
                torch.cat([support, query], -2), torch.cat([batch.support_y, batch.query_y], -1), batch.ways)
        return loss, {"accuracy": accuracy(logits, labels)}

    def contrastive_loss(self, features: Tensor, labels: Tensor, ways: int) -> Tensor:
        """The paper's regulariser: the set function adapts each class's set of embeddings (support and query)
        on its own; the adapted sets' centres classify every embedding [..., P, D] (labels [..., P]) at
        temperature2. Needs as many embeddings of each class (as episodes have)."""
        order = labels.argsort(dim=-1, stable=True)
        per_class = labels.shape[-1] // ways
        grouped_labels = labels.gather(-1, order)
        expected = torch.arange(ways, device=labels.device).repeat_interleave(per_class)
        if per_class * ways != labels.shape[-1] or not bool((grouped_labels == expected).all()):
            raise ValueError("FEAT's contrastive term needs the same number of examples of every class")
        grouped = features.gather(-2, order.unsqueeze(-1).expand_as(features))
        grouped = grouped.unflatten(-2, (ways, per_class))  # [..., N, K + Q, D]
        centres = self.set_function(grouped).mean(dim=-2)  # [..., N, D]
        logits = self.scores(features, centres, self.options["temperature2"])
        return F.cross_entropy(logits.reshape(-1, ways), labels.reshape(-1))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        prototypes = self.adapted_prototypes(support.flatten(1), support_y, classes_in(support_y))
        temperature = self.options["temperature"]
        return lambda query: self.scores(query.flatten(1), prototypes, temperature)
