"""PT-MAP (Hu, Gripon and Pateux, ICANN 2021, "Leveraging the Feature Distribution in Transfer-based Few-Shot
Learning"): power-transform the features towards Gaussian-like class distributions, then estimate the class
centres by a MAP-like iteration in which the query soft labels are an optimal transport (Sinkhorn) plan under
the prior that every class has the same number of queries.

Preprocessing (the authors' test_standard.py): v -> (v + 1e-6)^beta with beta 0.5, each feature vector scaled
to unit norm, then the support set and the query set each centred on its own mean and scaled to unit norm
again. (Their QR reduction only rewrites the vectors in an orthonormal basis of their span, which changes no
distance, so it is left out.) Backbones whose features can be negative (kshot's ResNet-12 ends in LeakyReLU)
get the sign-preserving transform sign(v) (|v| + 1e-6)^beta, equal to the paper's on non-negative features.

Iteration (their GaussianModel and MAP classes): centres start at the support class means; each of `epochs`
times, the query soft labels P are the Sinkhorn plan of exp(-lam * |x_q - mu_k|^2) with every query's row
summing to 1 and every class's column to Q / N; the centres move a fraction alpha towards the mean of the
support (one-hot) and query (P-weighted) features. The returned log-probabilities are those of the final plan
after one more Sinkhorn step, rows normalised to sum to 1. Defaults as their code: beta 0.5, lam 10, alpha 0.2,
20 epochs, Sinkhorn until the row sums move by at most 1e-6, at most 1,000 iterations.

The class-balance prior holds in standard episodes (the same number of queries per class); on unbalanced query
sets it biases the labels towards balance, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kshot.transductive.common import check_task, class_means, one_hot, squared_distances

DEFAULTS = {"beta": 0.5, "lam": 10.0, "alpha": 0.2, "epochs": 20, "sinkhorn_tolerance": 1e-6,
            "sinkhorn_iterations": 1000}
"""The authors' settings (module docstring)."""

POWER_EPSILON = 1e-6
"""Added before the power, as the authors' code does (keeps the power's gradient finite at 0)."""


def power_transform(features: Tensor, beta: float = 0.5) -> Tensor:
    """(v + 1e-6)^beta elementwise, with the sign kept for negative entries: sign(v) (|v| + 1e-6)^beta."""
    magnitude = (features.abs() + POWER_EPSILON).pow(beta)
    return torch.where(features < 0, -magnitude, magnitude)


def preprocess(support: Tensor, query: Tensor, beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """PT-MAP's features: power transform, unit norm, then each set centred on its own mean and unit norm."""
    support = F.normalize(power_transform(support, beta), dim=1)
    query = F.normalize(power_transform(query, beta), dim=1)
    return F.normalize(support - support.mean(0), dim=1), F.normalize(query - query.mean(0), dim=1)


def sinkhorn(cost: Tensor, rows: Tensor, columns: Tensor, lam: float, tolerance: float = 1e-6,
             max_iterations: int = 1000) -> Tensor:
    """The entropic optimal transport plan P [Q, N] for cost [Q, N] with row sums `rows` [Q] and column sums
    `columns` [N] (equal totals), as the authors compute it: P = exp(-lam cost) / total, then alternately rows
    and columns rescaled until no row sum changes by more than `tolerance` (or `max_iterations`). It ends on a
    column rescaling, so the column sums are exact and the row sums close to theirs (the closer, the smaller
    `tolerance`)."""
    plan = torch.exp(-lam * (cost - cost.min()))  # a constant shift, removed by the normalisation below
    plan = plan / plan.sum()
    previous = torch.zeros_like(rows)
    for _ in range(max_iterations):
        current = plan.sum(1)
        if float((previous - current).abs().max()) <= tolerance:
            break
        previous = current
        plan = plan * (rows / current).unsqueeze(1)
        plan = plan * (columns / plan.sum(0)).unsqueeze(0)
    return plan


def pt_map(support: Tensor, support_y: Tensor, query: Tensor, ways: int, *, beta: float = 0.5,
           lam: float = 10.0, alpha: float = 0.2, epochs: int = 20, sinkhorn_tolerance: float = 1e-6,
           sinkhorn_iterations: int = 1000) -> Tensor:
    """PT-MAP log-probabilities [Q, N] of one task's queries from raw support [S, D] and query [Q, D] features
    (module docstring). The transport runs in float64; the result has the features' dtype."""
    check_task(support, support_y, query, ways)
    dtype = support.dtype
    support, query = preprocess(support.double(), query.double(), beta)
    rows = torch.ones(len(query), dtype=torch.float64, device=query.device)
    columns = torch.full((ways,), len(query) / ways, dtype=torch.float64, device=query.device)
    support_mask = one_hot(support_y, ways, torch.float64)

    def plan(centres: Tensor) -> Tensor:
        return sinkhorn(squared_distances(query, centres), rows, columns, lam, sinkhorn_tolerance,
                        sinkhorn_iterations)

    centres = class_means(support, support_y, ways)
    for _ in range(epochs):
        soft = plan(centres)
        estimate = (support_mask.t() @ support + soft.t() @ query) / (support_mask.sum(0) + soft.sum(0)).unsqueeze(1)
        centres = centres + alpha * (estimate - centres)
    final = plan(centres)
    return (final / final.sum(1, keepdim=True)).clamp_min(1e-300).log().to(dtype)
