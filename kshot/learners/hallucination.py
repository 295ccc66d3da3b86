"""Prototypical Networks with feature hallucination (Wang, Girshick, Hebert and Hariharan, CVPR 2018, "Low-Shot
Learning from Imaginary Data"): a generator G(x, z) turns the feature x of a support example (the seed) and a
noise vector z into a new feature of the same class, and the meta-learner sees the real and the hallucinated
examples together. Here the meta-learner is ProtoNet (one of the paper's meta-learners): each prototype is the
mean of a class's real and `hallucinate` hallucinated support features, and the query cross-entropy trains G,
the backbone and (through the seeds) everything end to end, as in the paper's meta-learning setup.

G is the paper's: a three-layer MLP with leaky ReLU on the concatenation [x, z], its output a feature vector.
The paper does not fix the widths in the setting used here; `hidden` and `noise_dim` default to the feature
width. Seeds: hallucinated example j of a class grows from the class's support example j mod K, taken in a
canonical order (by content, `metric.canonical_order`), so every support example seeds as many as the others
and the prototypes do not depend on the order the support set was given in (the paper draws seeds at random).
The noise comes from the global RNG in training (seeded by the trainer) and, at test, from a generator seeded
with `test_seed` afresh for every support set, so evaluation is repeatable. With hallucinate = 0 the learner is
exactly ProtoNet (G is built but never used)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT
from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import canonical_order, class_means, embed_episode, squared_euclidean
from kshot.learners.options import Count, PositiveCount, feature_dim


class Hallucinator(nn.Module):
    """G(x, z): a three-layer MLP with leaky ReLU on [seed feature, noise] -> a new feature (Wang et al. 2018)."""

    def __init__(self, features: int, noise_dim: int, hidden: int) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(nn.Linear(features + noise_dim, hidden), nn.LeakyReLU(),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Linear(hidden, features))

    def forward(self, seeds: Tensor, noise: Tensor) -> Tensor:
        return self.net(torch.cat([seeds, noise], dim=-1))


def seed_indices(support: Tensor, labels: Tensor, ways: int, per_class: int) -> Tensor:
    """Positions [..., ways, per_class] in the support set (features [..., M, D], labels [..., M]) of the seed of
    each hallucinated example: class c's j-th example grows from its support example j mod K_c, in canonical
    order, so every class may have its own K_c and the choice does not depend on the given order."""
    order = canonical_order(support, labels)  # sorted by label, then content
    counts = F.one_hot(labels, ways).sum(-2)  # [..., ways]
    starts = counts.cumsum(-1) - counts
    offsets = torch.arange(per_class, device=labels.device) % counts.unsqueeze(-1)  # [..., ways, per_class]
    sorted_positions = (starts.unsqueeze(-1) + offsets).flatten(-2)  # into the sorted order
    return order.gather(-1, sorted_positions).unflatten(-1, (ways, per_class))


class ProtoNetHallucination(Learner):
    """ProtoNet whose prototypes also average `hallucinate` generated features a class (`Options`)."""

    name = "protonet-hallucination"
    works_on_features = True

    @dataclass(config=STRICT)
    class Options:
        """hallucinate: generated examples per class (0: exactly ProtoNet); noise_dim: length of the noise z;
        hidden: width of G's two hidden layers (both None: the feature width); test_seed: seeds the test-time
        noise afresh for every support set."""

        hallucinate: Count = 5
        noise_dim: PositiveCount | None = None
        hidden: PositiveCount | None = None
        test_seed: int = 0

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        width = feature_dim(backbone, self.image_shape)
        self.hallucinator = Hallucinator(width, self.options["noise_dim"] or width, self.options["hidden"] or width)

    def hallucinate(self, support: Tensor, support_y: Tensor, ways: int, noise: Tensor) -> Tensor:
        """Hallucinated features [..., ways, m, D] from support features [..., M, D] labelled [..., M] and noise
        [..., ways, m, noise_dim] (m = noise.shape[-2] examples per class)."""
        seeds = seed_indices(support, support_y, ways, noise.shape[-2])  # [..., ways, m]
        picked = support.gather(-2, seeds.flatten(-2).unsqueeze(-1).expand(*seeds.shape[:-2], -1, support.shape[-1]))
        return self.hallucinator(picked.unflatten(-2, seeds.shape[-2:]), noise)

    def test_noise(self, ways: int, device: torch.device, dtype: torch.dtype, seed: int | None = None) -> Tensor:
        """The test-time noise [ways, hallucinate, noise_dim]: drawn on the CPU from a generator seeded with
        `test_seed` (or `seed`), so it is the same on every call and on every device."""
        generator = torch.Generator().manual_seed(self.options["test_seed"] if seed is None else seed)
        shape = (ways, self.options["hallucinate"], self.hallucinator.noise_dim)
        return torch.randn(shape, generator=generator).to(device, dtype)

    def prototypes(self, support: Tensor, support_y: Tensor, ways: int, noise: Tensor | None) -> Tensor:
        """Class prototypes [..., ways, D]: means over each class's real support features [..., M, D] and,
        unless noise is None or has no examples, its hallucinated ones (G applied to seeds and noise)."""
        if noise is None or noise.shape[-2] == 0:
            return class_means(support, support_y, ways)
        one_hot = F.one_hot(support_y, ways).to(support.dtype)  # [..., M, ways]
        real = one_hot.transpose(-1, -2) @ support  # [..., ways, D]
        fake = self.hallucinate(support, support_y, ways, noise)  # [..., ways, m, D]
        count = one_hot.sum(-2).unsqueeze(-1) + noise.shape[-2]
        return (real + fake.sum(-2)) / count

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support, query = embed_episode(self.backbone, batch)
        lead = batch.support_y.dim()
        support, query = support.flatten(lead), query.flatten(lead)
        noise = torch.randn((*batch.support_y.shape[:-1], batch.ways, self.options["hallucinate"],
                             self.hallucinator.noise_dim), dtype=support.dtype, device=support.device)
        logits = -squared_euclidean(query, self.prototypes(support, batch.support_y, batch.ways, noise))
        logits, labels = logits.reshape(-1, batch.ways), batch.query_y.reshape(-1)
        return F.cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        ways = classes_in(support_y)
        support = support.flatten(1)
        noise = self.test_noise(ways, support.device, support.dtype)
        prototypes = self.prototypes(support, support_y, ways, noise)
        return lambda query: -squared_euclidean(query.flatten(1), prototypes)
