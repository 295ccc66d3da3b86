"""R2-D2 (Bertinetto, Henriques, Torr and Vedaldi, ICLR 2019, "Meta-learning with differentiable closed-form
solvers"): a ridge-regression head fitted in closed form on each task's support features, trained end to end by
back-propagating the query cross-entropy through the solve.

With support features X [M, D] and one-hot labels Y [M, N], the ridge solution is, by the Woodbury identity,
    W = (X^T X + lambda I_D)^-1 X^T Y = X^T (X X^T + lambda I_M)^-1 Y,
so the linear system is M x M (support size, small) instead of D x D (feature size, up to thousands): the
paper's section 3.2. Query logits are alpha * (X_q W) + beta, the paper's learnt "scale and bias" calibration
of the regression outputs for the cross-entropy. lambda, alpha and beta are meta-learnt with the backbone,
although under softmax cross-entropy beta (one scalar added to every logit) gets zero gradient and changes no
prediction: it is kept because the paper and its code have it.

Initial values (options): lambda 50 is `base_learner.init_lambda` and alpha 1e-4 `init_adj_scale` (its Omniglot
scripts use 10), beta 0 `AdjustLayer`'s bias, in the authors' code (github.com/bertinetto/r2d2). That code also
divides X and Y by sqrt(M) and appends a bias column of ones to X; here the formula is the paper's, without
either (the division is the same as multiplying lambda by M)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, PositiveFloat
from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import embed_episode


def ridge_weights(support: Tensor, targets: Tensor, lam: Tensor | float, double: bool = False) -> Tensor:
    """Ridge-regression weights W = X^T (X X^T + lam I)^-1 Y [..., D, N] for support features X [..., M, D]
    and targets Y [..., M, N], solved in the support-size dimension (Woodbury); batched over leading dims.
    `double` solves in float64 (steadier for large features) and returns the input dtype."""
    dtype = support.dtype
    if double:
        support, targets = support.double(), targets.double()
        lam = lam.double() if isinstance(lam, Tensor) else lam
    eye = torch.eye(support.shape[-2], dtype=support.dtype, device=support.device)
    gram = support @ support.transpose(-1, -2)  # [..., M, M]
    dual = torch.linalg.solve(gram + lam * eye, targets)  # [..., M, N]
    return (support.transpose(-1, -2) @ dual).to(dtype)


class R2D2(Learner):
    """R2-D2: closed-form ridge-regression head on backbone features (options: see `R2D2.Options`)."""

    name = "r2d2"
    works_on_features = True

    @dataclass(config=STRICT)
    class Options:
        """lambda_init: initial ridge regulariser (learnt as log lambda, so it stays positive, unless
        learn_lambda is false); scale_init, bias_init: initial alpha and beta of logits = alpha X_q W + beta
        (both learnt); double: solve the linear system in float64. Defaults: the authors' code (module docstring)."""

        lambda_init: PositiveFloat = 50.0
        learn_lambda: bool = True
        scale_init: float = 1e-4
        bias_init: float = 0.0
        double: bool = False

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        log_lambda = torch.tensor(math.log(self.options["lambda_init"]))
        if self.options["learn_lambda"]:
            self.log_lambda = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_lambda", log_lambda)
        self.scale = nn.Parameter(torch.tensor(float(self.options["scale_init"])))
        self.bias = nn.Parameter(torch.tensor(float(self.options["bias_init"])))

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """alpha * (query @ W) + beta [..., Q, N], W the ridge fit of the one-hot support labels; features
        [..., M, D] and [..., Q, D], labels [..., M]."""
        targets = F.one_hot(support_y, ways).to(support.dtype)
        weights = ridge_weights(support, targets, self.log_lambda.exp(), self.options["double"])
        return self.scale * (query @ weights) + self.bias

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support, query = embed_episode(self.backbone, batch)
        lead = batch.support_y.dim()  # flatten feature maps, keeping [..., M]
        logits = self.logits(support.flatten(lead), batch.support_y, query.flatten(lead), batch.ways)
        logits, labels = logits.reshape(-1, batch.ways), batch.query_y.reshape(-1)
        return F.cross_entropy(logits, labels), {"accuracy": accuracy(logits, labels)}

    def embed(self, images: Tensor) -> Tensor:
        """Backbone features flattened to vectors [M, D] (feature maps included), as the ridge fit takes them."""
        return self.backbone(images).flatten(1)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        targets = F.one_hot(support_y, classes_in(support_y)).to(support.dtype)
        weights = ridge_weights(support, targets, self.log_lambda.exp(), self.options["double"])
        return lambda query: self.scale * (query @ weights) + self.bias
