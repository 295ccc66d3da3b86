"""TIM-GD (Boudiaf, Ziko, Rony, Dolz, Piantanida and Ben Ayed, NeurIPS 2020, "Information Maximization for
Few-Shot Learning"): a classifier on fixed features, fitted to the support labels while maximising the mutual
information between the query features and their predicted labels.

The classifier has one weight vector w_k per class, initialised at the support prototypes (class means), with
logits  T * (x.w_k - |w_k|^2 / 2 - |x|^2 / 2) = -T/2 |x - w_k|^2  (the authors' 'l2' classifier). Gradient
descent (Adam) minimises

    ce_weight * CE(support) - marginal_weight * H(Y_Q) + conditional_weight * H(Y_Q | X_Q)

where CE is the support cross-entropy (mean over support examples), H(Y_Q) the entropy of the mean query
prediction (marginal: pushes towards balanced classes) and H(Y_Q | X_Q) the mean entropy of each query's
prediction (conditional: pushes towards confident ones); -H(Y_Q) + H(Y_Q|X_Q) is minus the mutual information.

Defaults are the authors' code (github.com/mboudiaf/TIM): `src/tim.py` sets temp 15, loss_weights
[0.1, 1.0, 0.1] for [Xent, H(Y), H(Y|X)] and lr 1e-4, and `scripts/evaluate/tim_gd/*.sh` run tim.iter=1000;
their features are L2-normalised (`src/eval.py`, norms_types ["L2N"]), which the learner does before calling
`tim`. Differences: logarithms are taken with log-softmax instead of log(softmax + 1e-12) (the same values
where that epsilon does not matter, steadier where it does), and the returned log-probabilities are those of
the final weights, as the authors' `get_preds` uses them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kshot.transductive.common import check_task, class_means, one_hot

DEFAULTS = {"temperature": 15.0, "ce_weight": 0.1, "marginal_weight": 1.0, "conditional_weight": 0.1,
            "iterations": 1000, "lr": 1e-4}
"""The authors' settings (module docstring)."""


def tim_logits(features: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """-T/2 |x - w_k|^2 for features [M, D] and class weights [N, D] -> [M, N], computed as the authors do."""
    return temperature * (features @ weights.t() - 0.5 * weights.pow(2).sum(1).unsqueeze(0)
                          - 0.5 * features.pow(2).sum(1, keepdim=True))


def tim_objective(weights: Tensor, support: Tensor, support_y: Tensor, query: Tensor, temperature: float = 15.0,
                  ce_weight: float = 0.1, marginal_weight: float = 1.0, conditional_weight: float = 0.1) -> Tensor:
    """The TIM-GD loss (module docstring) of class weights [N, D] on one task, written with autograd-able
    torch operations (tests differentiate it to check the closed-form gradient `tim_trace` uses)."""
    support_log = torch.log_softmax(tim_logits(support, weights, temperature), dim=1)
    cross_entropy = -support_log.gather(1, support_y.unsqueeze(1)).mean()
    query_log = torch.log_softmax(tim_logits(query, weights, temperature), dim=1)
    query_probs = query_log.exp()
    conditional = -(query_probs * query_log).sum(1).mean()
    marginal_probs = query_probs.mean(0)
    marginal = -(marginal_probs * marginal_probs.clamp_min(1e-30).log()).sum()
    return ce_weight * cross_entropy - marginal_weight * marginal + conditional_weight * conditional


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
"""torch.optim.Adam's defaults, which the authors' code uses."""


def tim_trace(support: Tensor, support_y: Tensor, query: Tensor, ways: int, *,
              temperature: float = 15.0, ce_weight: float = 0.1, marginal_weight: float = 1.0,
              conditional_weight: float = 0.1, iterations: int = 1000, lr: float = 1e-4,
              record: bool = True) -> tuple[Tensor, Tensor]:
    """TIM-GD on one task: log-probabilities [Q, N] of the queries, and (with `record`) the objective
    [iterations + 1] before each Adam step and after the last (else an empty tensor). Support [S, D] (labels
    [S] in 0..ways-1) and query [Q, D] features are used as given (normalise them first).

    The gradient is computed in closed form rather than by autograd (3 to 6 times faster on small tasks, and
    free of torch.no_grad / inference-mode concerns): with p = softmax(z) for the logits z of `tim_logits`,
    dL/dz is ce_weight (p - y) / S on support rows, and on query rows
    (marginal_weight / Q) p_j (log pbar_j - sum_k p_k log pbar_k) - (conditional_weight / Q) p_j (log p_j + h),
    h being the row's entropy and pbar the mean query prediction; dz_ik/dw_k = T (x_i - w_k). Adam's update is
    torch.optim.Adam's (betas 0.9, 0.999, eps 1e-8); tests check both against autograd and torch's Adam."""
    check_task(support, support_y, query, ways)
    support, query = support.detach(), query.detach()
    shots, queries = len(support), len(query)
    features = torch.cat([support, query])
    half_norms = 0.5 * features.pow(2).sum(1, keepdim=True)
    onehot = one_hot(support_y, ways, features.dtype)
    weights = class_means(support, support_y, ways)
    first, second = torch.zeros_like(weights), torch.zeros_like(weights)
    (beta1, beta2), values = ADAM_BETAS, []

    def predictions(weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Log-probabilities and probabilities of every row, each query's entropy, log of the mean query
        prediction; records the objective on the way when asked."""
        logits = temperature * (features @ weights.t() - 0.5 * weights.pow(2).sum(1).unsqueeze(0) - half_norms)
        log_probs = torch.log_softmax(logits, dim=1)
        probs = log_probs.exp()
        entropy = -(probs[shots:] * log_probs[shots:]).sum(1, keepdim=True)
        log_marginal = probs[shots:].mean(0).clamp_min(1e-30).log()
        if record:
            cross_entropy = -(onehot * log_probs[:shots]).sum() / shots
            marginal = -(probs[shots:].mean(0) * log_marginal).sum()
            values.append(ce_weight * cross_entropy - marginal_weight * marginal
                          + conditional_weight * entropy.mean())
        return log_probs, probs, entropy, log_marginal

    for step in range(1, iterations + 1):
        log_probs, probs, entropy, log_marginal = predictions(weights)
        query_probs = probs[shots:]
        dlogits = torch.cat([(ce_weight / shots) * (probs[:shots] - onehot),
                             (marginal_weight / queries) * query_probs
                             * (log_marginal - (query_probs * log_marginal).sum(1, keepdim=True))
                             - (conditional_weight / queries) * query_probs * (log_probs[shots:] + entropy)])
        gradient = temperature * (dlogits.t() @ features - dlogits.sum(0).unsqueeze(1) * weights)
        first.mul_(beta1).add_(gradient, alpha=1 - beta1)
        second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        denominator = (second.sqrt() / math.sqrt(1 - beta2 ** step)).add_(ADAM_EPS)
        weights = weights.addcdiv(first, denominator, value=-lr / (1 - beta1 ** step))
    log_probs = predictions(weights)[0]
    return log_probs[shots:], torch.stack(values) if record else features.new_zeros(0)


def tim(support: Tensor, support_y: Tensor, query: Tensor, ways: int, **options: float) -> Tensor:
    """TIM-GD log-probabilities [Q, N] of one task's queries (options: those of `tim_trace`)."""
    return tim_trace(support, support_y, query, ways, record=False, **options)[0]
