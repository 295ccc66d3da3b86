"""MetaOptNet-SVM (Lee, Maji, Ravichandran and Soatto, CVPR 2019, "Meta-Learning with Differentiable Convex
Optimization"): a Crammer-Singer multi-class linear SVM fitted on each task's support features by solving its
dual quadratic program, trained end to end by back-propagating the query cross-entropy through the solution
(implicit differentiation of the QP's KKT conditions, `kshot.learners.qp`).

The dual, in the notation of the authors' code (models/classification_heads.py, `MetaOptNetHead_SVM_CS`, after
liblinear): support features x_i [M, D] with labels y_i, one variable alpha_i^m per example i and class m,

    minimise 1/2 sum_m |w_m|^2 - sum_i alpha_i^{y_i}   with w_m = sum_i alpha_i^m x_i,
    subject to alpha_i^m <= C [m = y_i] and sum_m alpha_i^m = 0 for every i;

that is the QP 1/2 a^T (K kron I_N) a + p^T a with K = X X^T, p = -onehot(y), G = I, h = C onehot(y), A =
I_M kron 1_N^T, b = 0. Its primal is min 1/2 |W|^2 + C sum_i max_m (1 - [m = y_i] + w_m.x_i - w_{y_i}.x_i).
Query logits are scale * x_q W with W = X^T alpha [D, N] and a learnt scale (the authors' `ClassificationHead`).

Defaults are the authors' code's: C_reg 0.1; scale starting at 1; the QP solver capped at 15 iterations in
training (train.py calls the head with its default maxIter=15) and 3 at test (test.py passes maxIter=3); 1.0
added to the diagonal of K kron I ("this seems to help avoid PSD error from the QP solver", `dual_ridge`), which
also makes the problem strongly convex; float32 unless `double`. Their miniImageNet script also smooths the
training labels (eps 0.1: 1 - eps on the true class, eps / (N - 1) on each other), `label_smoothing` here.

Solver: qpth (their dependency) is unmaintained and pins old torch; cvxpylayers pulls in cvxpy and external
solvers and solves one problem at a time on the CPU; `kshot.learners.qp` is a small batched primal-dual
interior-point method in torch with the same iteration scheme as qpth (module docstring there). Iteration
counts therefore mean about what they mean in qpth, not exactly the same thing."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, NonNegativeFloat, PositiveFloat
from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import embed_episode
from kshot.learners.options import PositiveCount
from kshot.learners.qp import solve_qp


def crammer_singer_qp(support: Tensor, labels: Tensor, ways: int, C: float,
                      ridge: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Crammer-Singer dual (module docstring) as a QP (Q, p, h, A, b) for `kshot.learners.qp.solve_qp` with
    G the identity; support [B, M, D], labels [B, M] in 0..ways-1. Variable i * ways + m is alpha_i^m.
    `ridge` is added to Q's diagonal (the authors' code adds 1.0)."""
    batch, shots = labels.shape
    one_hot = F.one_hot(labels, ways).to(support.dtype).reshape(batch, shots * ways)
    kernel = support @ support.mT  # [B, M, M]
    eye = torch.eye(ways, dtype=support.dtype, device=support.device)
    Q = torch.einsum("bij,mn->bimjn", kernel, eye).reshape(batch, shots * ways, shots * ways)
    if ridge:
        Q = Q + ridge * torch.eye(shots * ways, dtype=support.dtype, device=support.device)
    A = torch.eye(shots, dtype=support.dtype, device=support.device).repeat_interleave(ways, dim=1)  # [M, M N]
    return Q, -one_hot, C * one_hot, A, support.new_zeros(shots)


def svm_weights(support: Tensor, labels: Tensor, ways: int, C: float, ridge: float = 0.0, max_iter: int = 15,
                double: bool = False, tol: float | None = None) -> Tensor:
    """The Crammer-Singer SVM's weights W = X^T alpha [B, D, N] for support features [B, M, D] and labels
    [B, M], differentiable in the features; `double` solves in float64 and returns the input dtype."""
    dtype = support.dtype
    features = support.double() if double else support
    Q, p, h, A, b = crammer_singer_qp(features, labels, ways, C, ridge)
    alpha = solve_qp(Q, p, None, h, A, b, max_iter=max_iter, tol=tol).reshape(labels.shape + (ways,))
    return (features.mT @ alpha).to(dtype)


class MetaOptNet(Learner):
    """MetaOptNet-SVM: a Crammer-Singer SVM head solved as a QP on backbone features (options: `Options`)."""

    name = "metaoptnet"
    works_on_features = True

    @dataclass(config=STRICT)
    class Options:
        """C_reg: the SVM's C; scale_init: initial learnt logit scale; train_iterations, test_iterations: QP
        solver iterations in training and at adaptation (evaluation); dual_ridge: added to the dual's Q diagonal;
        double: solve in float64; label_smoothing: eps of the training labels (1 - eps on the true class).
        Defaults: the authors' code (module docstring), except label smoothing (their miniImageNet script: 0.1)."""

        C_reg: PositiveFloat = 0.1
        scale_init: float = 1.0
        train_iterations: PositiveCount = 15
        test_iterations: PositiveCount = 3
        dual_ridge: NonNegativeFloat = 1.0
        double: bool = False
        label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        self.scale = nn.Parameter(torch.tensor(float(self.options["scale_init"])))

    def weights(self, support: Tensor, support_y: Tensor, ways: int, iterations: int) -> Tensor:
        """SVM weights [B, D, N] of support features [B, M, D] with labels [B, M]."""
        o = self.options
        return svm_weights(support, support_y, ways, o["C_reg"], o["dual_ridge"], iterations, o["double"])

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support, query = embed_episode(self.backbone, batch)
        lead = batch.support_y.dim()  # flatten feature maps, keeping [..., M]
        support, query = support.flatten(lead), query.flatten(lead)
        support_y = batch.support_y
        if lead == 1:
            support, query, support_y = support[None], query[None], support_y[None]
        weights = self.weights(support, support_y, batch.ways, self.options["train_iterations"])
        logits, labels = (self.scale * (query @ weights)).reshape(-1, batch.ways), batch.query_y.reshape(-1)
        return smoothed_cross_entropy(logits, labels, self.options["label_smoothing"]), \
            {"accuracy": accuracy(logits, labels)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        weights = self.weights(support.flatten(1)[None], support_y[None], classes_in(support_y),
                               self.options["test_iterations"])[0]
        return lambda query: self.scale * (query.flatten(1) @ weights)


def smoothed_cross_entropy(logits: Tensor, labels: Tensor, eps: float) -> Tensor:
    """Mean cross-entropy of logits [Q, N] against labels smoothed as the authors' train.py does: 1 - eps on the
    true class and eps / (N - 1) on each other (plain cross-entropy when eps is 0)."""
    ways = logits.shape[-1]
    if eps == 0 or ways == 1:
        return F.cross_entropy(logits, labels)
    target = F.one_hot(labels, ways).to(logits.dtype)
    target = target * (1 - eps) + (1 - target) * eps / (ways - 1)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
