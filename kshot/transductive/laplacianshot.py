"""LaplacianShot (Ziko, Dolz, Granger and Ben Ayed, ICML 2020, "Laplacian Regularized Few-Shot Learning"): the
query labels minimise a unary term (squared distance to the class prototypes) plus a Laplacian term that gives
nearby queries the same label, relaxed to soft labels on the simplex and solved by bound optimisation.

With unary costs a_q [Q, N], a query affinity W [Q, Q] and soft labels Y [Q, N], each bound iteration is

    Y <- softmax_rows(-a + lam * W Y),

starting from softmax(-a), until the relative change of the energy is at most 1e-6 or after 20 iterations;
the log of the final Y is returned. For a symmetric positive semi-definite W this is the minimiser of a tight
linear upper bound of the concave term, so the relaxed energy

    E(Y) = sum_q a_q . y_q + sum_q y_q . log y_q - lam / 2 * sum_{p,q} w_pq y_p . y_q

never increases (`laplacianshot_trace` returns it per iteration). The authors' code logs the same sum with lam
in place of lam / 2, which is not the function the iteration bounds; kshot stops on E as defined here.

Details from the authors' code (github.com/imtiazziko/LaplacianShot, src/train_lshot.py, src/lshot_update.py):
- features are CL2N (centred on the base-class mean, L2-normalised): the learner does this before the call;
- W is the k-nearest-neighbour graph of the queries: w_pq = 1 for the knn - 1 nearest other queries p of q
  (their NearestNeighbors(n_neighbors=knn) lists the query itself first), not symmetrised; knn 3;
- lam (their --lmd) defaults to 1.0; their run.sh tunes it on validation episodes over
  {0.1, 0.3, 0.5, 0.7, 0.8, 1.0, 1.2, 1.5} (set `lam` from such a search for a new backbone);
- prototype rectification (--proto-rect True in run.sh): queries are shifted by mean(support) - mean(query);
  the support examples and shifted queries are labelled by their nearest support-mean prototype (cosine);
  each prototype becomes the mean over its members x_i of softmax_classes(10 cos(x_i, P))_n * x_i. (This is
  their code; BD-CSPN, whose idea it follows, normalises the weights within each class instead, see
  `kshot.transductive.bd_cspn`.) A class left with no member keeps its support mean, where their code would
  drop it from the prototype list. The unary term is the squared distance of the shifted queries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kshot.transductive.common import check_task, class_means, cosine, one_hot, squared_distances

DEFAULTS = {"lam": 1.0, "knn": 3, "iterations": 20, "rectify": True, "rectify_scale": 10.0}
"""The authors' settings (module docstring)."""

TOLERANCE = 1e-6
"""Relative change of the energy at which the bound iterations stop (the authors' value)."""


def knn_affinity(features: Tensor, knn: int) -> Tensor:
    """[Q, Q] with w_pq = 1 for the knn - 1 nearest other rows p of each row q (fewer when Q <= knn - 1)."""
    neighbours = min(knn - 1, len(features) - 1)
    affinity = torch.zeros(len(features), len(features), dtype=features.dtype, device=features.device)
    if neighbours <= 0:
        return affinity
    distances = squared_distances(features, features)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(neighbours, dim=1, largest=False).indices
    return affinity.scatter_(1, nearest, 1.0)


def rectified_prototypes(support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: float = 10.0
                         ) -> tuple[Tensor, Tensor]:
    """The authors' rectified prototypes [N, D] and shifted queries [Q, D] (module docstring)."""
    shifted = query + (support.mean(0) - query.mean(0))
    members = torch.cat([support, shifted])
    basic = class_means(support, support_y, ways)
    similarity = cosine(members, basic)  # [S + Q, N]
    weights = torch.softmax(scale * similarity, dim=1)
    assigned = one_hot(similarity.argmax(1), ways, members.dtype)  # [S + Q, N]
    counts = assigned.sum(0)
    rectified = ((assigned * weights).t() @ members) / counts.clamp_min(1).unsqueeze(1)
    return torch.where((counts > 0).unsqueeze(1), rectified, basic), shifted


def energy(labels: Tensor, unary: Tensor, affinity: Tensor, lam: float) -> Tensor:
    """E(Y) = sum a.y + sum y log y - lam/2 sum_pq w_pq y_p.y_q (module docstring), a scalar."""
    entropy = (labels * labels.clamp_min(1e-20).log()).sum()
    return (unary * labels).sum() + entropy - 0.5 * lam * ((affinity @ labels) * labels).sum()


def laplacianshot_trace(support: Tensor, support_y: Tensor, query: Tensor, ways: int, *, lam: float = 1.0,
                        knn: int = 3, iterations: int = 20, rectify: bool = True, rectify_scale: float = 10.0,
                        affinity: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LaplacianShot on one task: log-probabilities [Q, N] of the queries and the energy after each bound
    iteration [iterations run]. `affinity` [Q, Q] replaces the kNN graph (e.g. a symmetric PSD kernel, for
    which the energy provably never increases)."""
    check_task(support, support_y, query, ways)
    if rectify:
        prototypes, query = rectified_prototypes(support, support_y, query, ways, rectify_scale)
    else:
        prototypes = class_means(support, support_y, ways)
    unary = squared_distances(query, prototypes)
    if affinity is None:
        affinity = knn_affinity(query, knn)
    logits = -unary
    labels = torch.softmax(logits, dim=1)
    energies = []
    for _ in range(iterations):
        logits = -unary + lam * (affinity @ labels)
        labels = torch.softmax(logits, dim=1)
        energies.append(energy(labels, unary, affinity, lam))
        if len(energies) > 2 and float((energies[-1] - energies[-2]).abs()) <= TOLERANCE * float(energies[-2].abs()):
            break
    trace = torch.stack(energies) if energies else logits.new_zeros(0)
    return torch.log_softmax(logits, dim=1), trace


def laplacianshot(support: Tensor, support_y: Tensor, query: Tensor, ways: int, **options: float) -> Tensor:
    """LaplacianShot log-probabilities [Q, N] of one task's queries (options: those of `laplacianshot_trace`)."""
    return laplacianshot_trace(support, support_y, query, ways, **options)[0]
