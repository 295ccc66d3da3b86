"""BD-CSPN (Liu, Song and Qin, ECCV 2020, "Prototype Rectification for Few-Shot Learning"): a cosine-similarity
prototype classifier whose prototypes are rectified with the unlabelled queries, reducing two biases.

- Cross-class bias: the support and query sets are centred differently; the paper's shifting term
  xi = mean(support) - mean(query) is added to every query feature.
- Intra-class bias: a prototype from K examples is far from the class's expected feature. Queries get pseudo
  labels from the basic prototypes P_n (support class means, by cosine similarity), and each class's members
  X' (its support examples and its pseudo-labelled queries) are averaged with weights
      w_i = exp(eps * cos(X'_i, P_n)) / sum_j exp(eps * cos(X'_j, P_n))      (over the members j of class n)
  giving the rectified prototype P'_n = sum_i w_i X'_i.
Queries are then scored by eps * cos(x_q + xi, P'_n); the log-softmax of these logits is returned.

eps is 10 as in the paper. The paper adds the top Z most confident pseudo-labelled queries of each class;
the authors released no code, and the public re-implementations (EasyFSL; Veilleux et al. 2021, "Realistic
evaluation of transductive few-shot learning") add every pseudo-labelled query, which `pseudo_per_class=None`
(the default) does; an integer keeps the Z queries of highest predicted probability per class. The paper
shifts and compares L2-normalised features: the learner normalises them before calling `bd_cspn`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kshot.transductive.common import check_task, class_means, cosine, one_hot

DEFAULTS = {"scale": 10.0, "pseudo_per_class": None}
"""The paper's eps; every pseudo-labelled query (module docstring)."""


def rectified_prototypes(support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: float = 10.0,
                         pseudo_per_class: int | None = None) -> tuple[Tensor, Tensor]:
    """BD-CSPN's rectified prototypes P'_n [N, D] and the shifted queries x_q + xi [Q, D] (module docstring)."""
    shifted = query + (support.mean(0) - query.mean(0))
    basic = class_means(support, support_y, ways)
    query_similarity = cosine(shifted, basic)  # [Q, N]
    pseudo = one_hot(query_similarity.argmax(1), ways, torch.bool)  # [Q, N]
    if pseudo_per_class is not None:
        confidence = torch.softmax(scale * query_similarity, dim=1).masked_fill(~pseudo, -1.0)
        top = confidence.topk(min(pseudo_per_class, len(query)), dim=0).indices  # [Z, N]
        pseudo = pseudo & torch.zeros_like(pseudo).scatter_(0, top, True)
    members = torch.cat([one_hot(support_y, ways, torch.bool), pseudo])  # [S + Q, N]
    candidates = torch.cat([support, shifted])
    scores = (scale * cosine(candidates, basic)).masked_fill(~members, float("-inf"))
    weights = torch.softmax(scores, dim=0)  # over each class's members; every class has its support examples
    return weights.t() @ candidates, shifted


def bd_cspn(support: Tensor, support_y: Tensor, query: Tensor, ways: int, *, scale: float = 10.0,
            pseudo_per_class: int | None = None) -> Tensor:
    """BD-CSPN log-probabilities [Q, N] of one task's queries: log-softmax of eps * cos(x_q + xi, P'_n)."""
    check_task(support, support_y, query, ways)
    prototypes, shifted = rectified_prototypes(support, support_y, query, ways, scale, pseudo_per_class)
    return torch.log_softmax(scale * cosine(shifted, prototypes), dim=1)
