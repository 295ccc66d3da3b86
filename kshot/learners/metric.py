"""Small tensor helpers shared by the metric-based learners: embedding an episode, class means, distances."""

from __future__ import annotations

import torch
from torch import Tensor

from kshot.episode import Episode


def embed_episode(backbone: torch.nn.Module, batch: Episode) -> tuple[Tensor, Tensor]:
    """Support and query features [..., M, *feature shape] from one forward pass over both (one batch-norm
    batch, as the reference implementations do); works for single episodes and meta-batches."""
    lead = batch.support_x.shape[:-4]
    support = batch.support_x.reshape(-1, *batch.support_x.shape[-3:])
    query = batch.query_x.reshape(-1, *batch.query_x.shape[-3:])
    features = backbone(torch.cat([support, query]))
    shape = features.shape[1:]
    return (features[: len(support)].reshape(*lead, batch.support_x.shape[-4], *shape),
            features[len(support):].reshape(*lead, batch.query_x.shape[-4], *shape))


def class_means(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean feature of each class: features [..., M, D], labels [..., M] in 0..ways-1 -> [..., ways, D]."""
    one_hot = torch.nn.functional.one_hot(labels, ways).to(features.dtype)  # [..., M, ways]
    sums = one_hot.transpose(-1, -2) @ features
    return sums / one_hot.sum(dim=-2).unsqueeze(-1)


def canonical_order(features: Tensor, labels: Tensor) -> Tensor:
    """Index [..., M] that sorts each support set by label, then by a content key (the feature sum), so that
    an order-sensitive step (FCE's LSTM, Baseline's mini-batches) sees the same sequence whatever order the
    support set was given in; features [..., M, D], labels [..., M]."""
    order = features.detach().sum(-1).argsort(dim=-1, stable=True)
    by_label = labels.gather(-1, order).argsort(dim=-1, stable=True)
    return order.gather(-1, by_label)


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances: a [..., P, D], b [..., R, D] -> [..., P, R]."""
    # ||a||^2 - 2 a.b + ||b||^2: one matrix product instead of a [P, R, D] difference tensor.
    cross = a @ b.transpose(-1, -2)
    return (a.pow(2).sum(-1, keepdim=True) - 2 * cross + b.pow(2).sum(-1).unsqueeze(-2)).clamp_min(0)
