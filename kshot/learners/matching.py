"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, 2016): a query's class
distribution is the softmax attention over cosine similarities to the support examples, summed over their
one-hot labels; optionally with full context embeddings (FCE, the paper's appendix A.2)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, PositiveFloat
from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import canonical_order, embed_episode
from kshot.learners.options import PositiveCount, feature_dim


def attention_log_probs(query: Tensor, support: Tensor, support_y: Tensor, ways: int,
                        scale: float | Tensor = 1.0) -> Tensor:
    """log P(y | query) = log sum_i softmax_i(scale * cos(query, support_i)) onehot(y_i); [..., Q, N]."""
    similarity = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(-1, -2)
    attention = (scale * similarity).softmax(dim=-1)  # [..., Q, M]
    probabilities = attention @ F.one_hot(support_y, ways).to(attention.dtype)
    return probabilities.clamp_min(1e-12).log()


class SupportContext(nn.Module):
    """g(x_i, S) = h_forward_i + h_backward_i + g'(x_i): a bidirectional LSTM over the support embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)

    def forward(self, support: Tensor) -> Tensor:
        """support [B, M, D] (in sequence order) -> context embeddings [B, M, D]."""
        out, _ = self.lstm(support)
        forward, backward = out.chunk(2, dim=-1)
        return forward + backward + support


class QueryAttention(nn.Module):
    """f(x, S) = attLSTM(f'(x), g(S), K): K steps of an LSTM whose hidden state is [h, r], r a read-out of
    g(S) by softmax(h . g(x_i)) attention, with the skip connection h_k = h^_k + f'(x)."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"processing_steps must be >= 1, got {steps}")
        self.steps = steps
        self.input_gates = nn.Linear(dim, 4 * dim)
        self.hidden_gates = nn.Linear(2 * dim, 4 * dim, bias=False)

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        """query [B, Q, D], support context embeddings [B, M, D] -> query embeddings [B, Q, D]."""
        hidden = torch.zeros_like(query)
        cell = torch.zeros_like(query)
        from_input = self.input_gates(query)
        for _ in range(self.steps):
            readout = (hidden @ support.transpose(-1, -2)).softmax(dim=-1) @ support
            gates = from_input + self.hidden_gates(torch.cat([hidden, readout], dim=-1))
            in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
            cell = forget_gate.sigmoid() * cell + in_gate.sigmoid() * candidate.tanh()
            hidden = out_gate.sigmoid() * cell.tanh() + query
        return hidden


class MatchingNet(Learner):
    """Matching Networks (options: see `MatchingNet.Options`)."""

    name = "matching"
    works_on_features = True  # FCE contextualises fixed backbone features, per task, inside adapt_embedded

    @dataclass(config=STRICT)
    class Options:
        """fce: full context embeddings; processing_steps: K of the attention LSTM; scale: multiplies cosine
        similarities before the softmax (1 as in the paper); learn_scale: make the scale a learned temperature
        starting at `scale` (with scale 1 the attention over non-negative ReLU features is nearly uniform and
        training plateaus, the problem Oreshkin et al. 2018 fix by metric scaling)."""

        fce: bool = False
        processing_steps: PositiveCount = 5
        scale: PositiveFloat = 1.0
        learn_scale: bool = False

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        self.support_context: SupportContext | None = None
        self.query_attention: QueryAttention | None = None
        self.log_scale: nn.Parameter | None = None
        if self.options["learn_scale"]:
            self.log_scale = nn.Parameter(torch.tensor(float(self.options["scale"])).log())
        if self.options["fce"]:
            dim = feature_dim(backbone, self.image_shape)
            self.support_context = SupportContext(dim)
            self.query_attention = QueryAttention(dim, int(self.options["processing_steps"]))

    def log_probs(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Class log-probabilities [..., Q, N] of query features given support features and labels."""
        single = support.dim() == 2
        if single:
            support, support_y, query = support.unsqueeze(0), support_y.unsqueeze(0), query.unsqueeze(0)
        if self.support_context is not None and self.query_attention is not None:
            order = canonical_order(support, support_y)
            support = support.gather(1, order.unsqueeze(-1).expand_as(support))
            support_y = support_y.gather(1, order)
            support = self.support_context(support)
            query = self.query_attention(query, support)
        scale = self.log_scale.exp() if self.log_scale is not None else float(self.options["scale"])
        out = attention_log_probs(query, support, support_y, ways, scale)
        return out[0] if single else out

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support, query = embed_episode(self.backbone, batch)
        log_probs = self.log_probs(support, batch.support_y, query, batch.ways)
        log_probs, labels = log_probs.reshape(-1, batch.ways), batch.query_y.reshape(-1)
        return F.nll_loss(log_probs, labels), {"accuracy": accuracy(log_probs, labels)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        """With FCE, the support set's context embedding g(x_i, S) is built from these features here, and each
        query's f(x, S) attends to it on its own (no query sees another), so the learner is not transductive."""
        ways = classes_in(support_y)
        return lambda query: self.log_probs(support, support_y, query, ways)
