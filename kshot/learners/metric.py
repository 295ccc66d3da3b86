"""Small tensor helpers shared by the metric-based learners: class means and distances."""

from __future__ import annotations

import torch
from torch import Tensor


def class_means(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean feature of each class: features [..., M, D], labels [..., M] in 0..ways-1 -> [..., ways, D]."""
    one_hot = torch.nn.functional.one_hot(labels, ways).to(features.dtype)  # [..., M, ways]
    sums = one_hot.transpose(-1, -2) @ features
    return sums / one_hot.sum(dim=-2).unsqueeze(-1)


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances: a [..., P, D], b [..., R, D] -> [..., P, R]."""
    # ||a||^2 - 2 a.b + ||b||^2: one matrix product instead of a [P, R, D] difference tensor.
    cross = a @ b.transpose(-1, -2)
    return (a.pow(2).sum(-1, keepdim=True) - 2 * cross + b.pow(2).sum(-1).unsqueeze(-2)).clamp_min(0)
