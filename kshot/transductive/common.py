"""Small tensor helpers shared by the transductive methods (kept here rather than imported from kshot.learners,
so that this package depends on torch alone and the learners can import it without a cycle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """[M, ways] one-hot rows of labels [M] in 0..ways-1."""
    return F.one_hot(labels, ways).to(dtype)


def class_means(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean feature of each class: features [M, D], labels [M] in 0..ways-1 -> [ways, D]."""
    member = one_hot(labels, ways, features.dtype)
    return (member.t() @ features) / member.sum(0).unsqueeze(1)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances a [P, D], b [R, D] -> [P, R], as a difference tensor would give them
    (|a|^2 - 2 a.b + |b|^2, clamped at 0 against rounding)."""
    return (a.pow(2).sum(-1, keepdim=True) - 2 * a @ b.t() + b.pow(2).sum(-1).unsqueeze(0)).clamp_min(0)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosine similarities a [P, D], b [R, D] -> [P, R]."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


def check_task(support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> None:
    """A one-line error for shapes that cannot be one task: support [S, D], labels [S] covering 0..ways-1,
    query [Q, D] with Q >= 1."""
    if support.dim() != 2 or query.dim() != 2 or support.shape[1] != query.shape[1]:
        raise ValueError(f"transductive inference needs support [S, D] and query [Q, D] features, got "
                         f"{tuple(support.shape)} and {tuple(query.shape)}")
    if support_y.shape != support.shape[:1]:
        raise ValueError(f"{len(support)} support features but labels of shape {tuple(support_y.shape)}")
    if len(query) == 0:
        raise ValueError("transductive inference needs at least one query")
    if ways < 1 or int(support_y.min()) < 0 or int(support_y.max()) >= ways or \
            bool((torch.bincount(support_y, minlength=ways) == 0).any()):
        raise ValueError(f"support labels must cover 0..{ways - 1} with every class present at least once")
