"""Each learner's training loss and predictions against its paper's formula, on tiny hand-checkable cases
(issue 10, item 8). Backbones are replaced by nn.Flatten / nn.Identity on 2-D or 3-D "images" [M, 1, 1, D] (or
set by hand), and every expected value is computed here independently: literal numbers, plain Python maths,
or closed forms (softmax-regression gradients) differentiated with torch.autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kshot.episode import Episode
from kshot.learners import LEARNERS

TOL = {"atol": 1e-5, "rtol": 1e-5}


def images(*rows: tuple[float, ...]) -> Tensor:
    """Feature vectors as images [M, 1, 1, D], which nn.Flatten turns back into [M, D]."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 1, -1)


def labels(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.long)


def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Episode:
    return Episode(sx, sy, qx, qy, torch.arange(int(sy.max()) + 1))


def make(name: str, backbone: nn.Module, dim: int, **options) -> nn.Module:
    """The registered learner `name` on `backbone` for inputs [*, 1, 1, dim]."""
    return LEARNERS[name](backbone, (1, 1, dim), **options)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def cross_entropy(logits: list[list[float]], targets: list[int]) -> float:
    """Mean of -log softmax(logits)[target], in plain Python."""
    total = 0.0
    for row, target in zip(logits, targets):
        total += math.log(sum(math.exp(v) for v in row)) - row[target]
    return total / len(targets)


def set_(parameter: Tensor, value) -> None:
    with torch.no_grad():
        parameter.copy_(torch.as_tensor(value, dtype=parameter.dtype).reshape(parameter.shape))


# --------------------------------------------------------------------------------------------------- ProtoNet
def test_protonet_prototypes_are_class_means_and_logits_minus_squared_distance():
    learner = make("protonet", nn.Flatten(), 2)
    # Class 0: (0,0), (2,0) -> prototype (1,0); class 1: (0,2), (0,4) -> (0,3); support interleaved on purpose.
    sx, sy = images((0, 2), (0, 0), (0, 4), (2, 0)), labels(1, 0, 1, 0)
    qx, qy = images((1, 1), (0, 2.5)), labels(0, 1)
    logits = learner.adapt(sx, sy)(qx)
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -5.0], [-7.25, -0.25]]), atol=1e-5, rtol=0)
    loss, _ = learner.loss(task(sx, sy, qx, qy))
    expected = (math.log1p(math.exp(-4)) + math.log1p(math.exp(-7))) / 2  # cross-entropy of the two queries
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_protonet_on_random_features_and_a_meta_batch():
    generator = torch.Generator().manual_seed(0)
    learner = make("protonet", nn.Flatten(), 4)
    tasks, expected_losses = [], []
    for _ in range(2):
        sx, qx = torch.randn(6, 1, 1, 4, generator=generator), torch.randn(3, 1, 1, 4, generator=generator)
        sy, qy = labels(2, 0, 1, 1, 0, 2), labels(1, 2, 0)
        s, q = sx.flatten(1).tolist(), qx.flatten(1).tolist()
        prototypes = [[sum(s[i][d] for i in range(6) if sy[i] == c) / 2 for d in range(4)] for c in range(3)]
        expected = [[-sum((q[j][d] - prototypes[c][d]) ** 2 for d in range(4)) for c in range(3)] for j in range(3)]
        torch.testing.assert_close(learner.adapt(sx, sy)(qx), torch.tensor(expected), **TOL)
        single, _ = learner.loss(task(sx, sy, qx, qy))
        assert single.item() == pytest.approx(cross_entropy(expected, qy.tolist()), abs=1e-5)
        tasks.append(task(sx, sy, qx, qy))
        expected_losses.append(single.item())
    batched, _ = learner.loss(Episode.stack(tasks))
    assert batched.item() == pytest.approx(sum(expected_losses) / 2, abs=1e-5)


# ---------------------------------------------------------------------------------------- Matching Networks
def matching_log_probs(query: list[list[float]], support: list[list[float]], support_y: list[int], ways: int,
                       scale: float = 1.0) -> list[list[float]]:
    """log sum_i softmax_i(scale * cos(q, s_i)) onehot(y_i), in plain Python."""

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    out = []
    for q in query:
        weights = [math.exp(scale * cos(q, s)) for s in support]
        total = sum(weights)
        out.append([math.log(sum(w for w, y in zip(weights, support_y) if y == c) / total) for c in range(ways)])
    return out


def test_matching_attention_literal_case():
    learner = make("matching", nn.Flatten(), 2)
    sx, sy = images((1, 0), (0, 1), (1, 1)), labels(0, 1, 1)
    log_probs = learner.adapt(sx, sy)(images((1, 0)))
    e = math.exp
    p0 = e(1) / (e(1) + e(0) + e(1 / math.sqrt(2)))  # cosines 1, 0 and 1/sqrt(2)
    torch.testing.assert_close(log_probs, torch.tensor([[math.log(p0), math.log(1 - p0)]]), **TOL)


@pytest.mark.parametrize("options", [{}, {"scale": 3.0}, {"scale": 3.0, "learn_scale": True}])
def test_matching_cosine_softmax_attention_and_loss(options):
    generator = torch.Generator().manual_seed(1)
    learner = make("matching", nn.Flatten(), 3, **options)
    scale = float(options.get("scale", 1.0))
    sx, qx = torch.randn(6, 1, 1, 3, generator=generator), torch.randn(4, 1, 1, 3, generator=generator)
    sy, qy = labels(0, 1, 2, 2, 1, 0), labels(2, 0, 1, 1)
    expected = matching_log_probs(qx.flatten(1).tolist(), sx.flatten(1).tolist(), sy.tolist(), 3, scale)
    torch.testing.assert_close(learner.adapt(sx, sy)(qx), torch.tensor(expected), **TOL)
    loss, _ = learner.loss(task(sx, sy, qx, qy))
    assert loss.item() == pytest.approx(-sum(expected[j][y] for j, y in enumerate(qy.tolist())) / 4, abs=1e-5)
    if options.get("learn_scale"):
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())


def lstm_constant_gates(bias: tuple[float, float, float, float], steps: int) -> list[float]:
    """Hidden outputs h_1..h_steps of an LSTM cell whose weights are zero and whose gate pre-activations are
    the constants bias = (input, forget, candidate, output): c_t = f c_{t-1} + i g, h_t = o tanh(c_t)."""
    i, f, g, o = sigmoid(bias[0]), sigmoid(bias[1]), math.tanh(bias[2]), sigmoid(bias[3])
    cell, out = 0.0, []
    for _ in range(steps):
        cell = f * cell + i * g
        out.append(o * math.tanh(cell))
    return out


def fce_learner(dim: int, steps: int) -> nn.Module:
    torch.manual_seed(0)
    return make("matching", nn.Flatten(), dim, fce=True, processing_steps=steps)


def test_fce_support_embedding_is_bidirectional_lstm_plus_skip_connection():
    learner = fce_learner(2, 1)
    lstm = learner.support_context.lstm
    forward_bias, backward_bias = (0.5, -1.0, 1.5, 0.3), (-0.2, 0.7, -0.8, 1.1)
    for name, parameter in lstm.named_parameters():
        if name.startswith("bias_ih"):
            set_(parameter, torch.tensor(backward_bias if "reverse" in name else forward_bias).repeat_interleave(2))
        else:
            set_(parameter, torch.zeros_like(parameter))
    support = torch.tensor([[[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]]])  # [B=1, M=3, D=2]
    forward, backward = lstm_constant_gates(forward_bias, 3), lstm_constant_gates(backward_bias, 3)
    # g(x_t) = h_forward(t) + h_backward(t) + g'(x_t); the backward LSTM reaches x_t after M - t steps.
    expected = support + torch.tensor([forward[t] + backward[2 - t] for t in range(3)]).view(1, 3, 1)
    torch.testing.assert_close(learner.support_context(support), expected, **TOL)
    # With every LSTM weight and bias zero, h = 0: the embedding is the backbone output itself.
    for parameter in lstm.parameters():
        set_(parameter, torch.zeros_like(parameter))
    torch.testing.assert_close(learner.support_context(support), support, atol=0, rtol=0)


def test_fce_query_embedding_is_att_lstm_with_skip_connection():
    steps = 3
    learner = fce_learner(2, steps)
    attention = learner.query_attention
    bias = (0.4, 0.9, -1.2, 0.6)  # input, forget, candidate, output gates
    set_(attention.input_gates.weight, torch.zeros(8, 2))
    set_(attention.input_gates.bias, torch.tensor(bias).repeat_interleave(2))
    set_(attention.hidden_gates.weight, torch.zeros(8, 4))
    query = torch.tensor([[[1.0, 2.0], [-0.5, 0.25]]])
    support = torch.tensor([[[0.3, -0.1], [1.0, 1.0], [-2.0, 0.5]]])
    # K steps of the cell, then h_K = LSTM output + f'(x) (the skip connection).
    expected = query + lstm_constant_gates(bias, steps)[-1]
    torch.testing.assert_close(attention(query, support), expected, **TOL)
    for parameter in attention.parameters():
        set_(parameter, torch.zeros_like(parameter))
    torch.testing.assert_close(attention(query, support), query, atol=0, rtol=0)


def reference_lstm(xs: list[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> list[Tensor]:
    """Hidden states of a PyTorch-convention LSTM (gates i, f, g, o) over xs, from zero state."""
    h = torch.zeros(w_hh.shape[1])
    c = torch.zeros(w_hh.shape[1])
    out = []
    for x in xs:
        i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        out.append(h)
    return out


def reference_fce(support: Tensor, query: Tensor, learner: nn.Module, steps: int) -> tuple[Tensor, Tensor]:
    """g(S) and f(x, S) of Vinyals et al.'s appendix A.2, written out step by step."""
    p = dict(learner.support_context.lstm.named_parameters())
    xs = list(support)
    forward = reference_lstm(xs, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"])
    backward = reference_lstm(xs[::-1], p["weight_ih_l0_reverse"], p["weight_hh_l0_reverse"],
                              p["bias_ih_l0_reverse"], p["bias_hh_l0_reverse"])[::-1]
    g = torch.stack([xs[t] + forward[t] + backward[t] for t in range(len(xs))])
    att = learner.query_attention
    f = []
    for x in query:
        h, c = torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(steps):
            r = torch.softmax(g @ h, dim=0) @ g  # read-out of g(S) attended by h_{k-1}
            gates = att.input_gates.weight @ x + att.input_gates.bias + att.hidden_gates.weight @ torch.cat([h, r])
            i, fg, cand, o = gates.chunk(4)
            c = fg.sigmoid() * c + i.sigmoid() * cand.tanh()
            h = o.sigmoid() * c.tanh() + x  # h_k = h^_k + f'(x)
        f.append(h)
    return g, torch.stack(f)


def test_fce_predictions_and_loss_against_the_written_out_formula():
    steps = 2
    learner = fce_learner(3, steps)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.normal_(0, 0.5, generator=generator)
    # Canonical order: by label, then by the sum of the features (kshot sorts the support set so).
    canonical = images((1.0, -1.0, -0.5), (0.5, 0.5, 0.2), (-1.0, 0.0, 0.3), (2.0, 1.0, -0.4))
    canonical_y = labels(0, 0, 1, 1)
    qx, qy = images((0.2, -0.3, 1.0), (-1.0, 2.0, 0.5), (0.7, 0.1, -0.9)), labels(1, 0, 1)
    with torch.no_grad():
        g, f = reference_fce(canonical.flatten(1), qx.flatten(1), learner, steps)
    expected = matching_log_probs(f.tolist(), g.tolist(), canonical_y.tolist(), 2)
    order = labels(2, 0, 3, 1)  # the support set as given: not in canonical order
    with torch.no_grad():
        log_probs = learner.adapt(canonical[order], canonical_y[order])(qx)
        loss, _ = learner.loss(task(canonical[order], canonical_y[order], qx, qy))
    torch.testing.assert_close(log_probs, torch.tensor(expected), **TOL)
    assert loss.item() == pytest.approx(-sum(expected[j][y] for j, y in enumerate(qy.tolist())) / 3, abs=1e-5)


# --------------------------------------------------------------------------------------- Relation Networks
def test_relation_score_is_sigmoid_of_class_sum_and_query_trained_by_mse():
    learner = make("relation", nn.Identity(), 1, relation_channels=2, relation_hidden=2)
    # A relation module set by hand on 1x1 "maps": score = sigmoid(0.5 * class_sum - 1.0 * query + 0.25).
    learner.relation.blocks = nn.Identity()
    learner.relation.fc = nn.Linear(2, 1)
    set_(learner.relation.fc.weight, [[0.5, -1.0]])
    set_(learner.relation.fc.bias, [0.25])
    sx, sy = images((1.0,), (-1.0,), (2.0,), (0.5,)), labels(0, 1, 0, 1)  # class sums: 3.0 and -0.5
    qx, qy = images((0.5,), (-2.0,)), labels(0, 1)
    sums, queries = [3.0, -0.5], [0.5, -2.0]
    expected = [[sigmoid(0.5 * s - q + 0.25) for s in sums] for q in queries]
    torch.testing.assert_close(learner.adapt(sx, sy)(qx), torch.tensor(expected), **TOL)
    loss, _ = learner.loss(task(sx, sy, qx, qy))
    mse = sum((expected[j][c] - (c == y)) ** 2 for j, y in enumerate([0, 1]) for c in range(2)) / 4
    assert loss.item() == pytest.approx(mse, abs=1e-6)


# ----------------------------------------------------------------------------------------- Siamese Networks
PAIRS_FIRST = images((0, 0), (1, 1), (3, 1), (0, 0))
PAIRS_SECOND = images((1, 0), (1, 3), (0, 0), (0.3, 0.4))
PAIRS_SAME = torch.tensor([1.0, 0.0, 0.0, 0.0])


def test_siamese_bce_head_is_sigmoid_of_weighted_l1_distance():
    learner = make("siamese", nn.Flatten(), 2, head="bce")
    set_(learner.head.weight, [[1.0, -2.0]])
    set_(learner.head.bias, [0.5])
    # |x1 - x2| = (1,0), (0,2), (3,1), (0.3,0.4) -> logits 1.5, -3.5, 1.5, 0.0
    logits = [1.5, -3.5, 1.5, 0.3 - 0.8 + 0.5]
    same = [1, 0, 0, 0]
    bce = -sum(math.log(sigmoid(s)) if t else math.log(1 - sigmoid(s)) for s, t in zip(logits, same)) / 4
    loss, _ = learner.loss((PAIRS_FIRST, PAIRS_SECOND, PAIRS_SAME))
    assert loss.item() == pytest.approx(bce, abs=1e-6)
    # N-way: a query's score for a class is the mean logit over that class's support examples.
    sx, sy = images((0, 0), (2, 0), (0, 2)), labels(0, 0, 1)
    scores = learner.adapt(sx, sy)(images((1, 0), (0, 3)))
    torch.testing.assert_close(scores, torch.tensor([[1.5, -2.5], [-4.5, -1.5]]), **TOL)


def test_siamese_contrastive_head():
    learner = make("siamese", nn.Flatten(), 2, head="contrastive", margin=2.0)
    # distances 1, 2, sqrt(10), 0.5: same pair -> d^2; different pairs -> max(0, margin - d)^2; halved mean.
    expected = (1.0 + 0.0 + 0.0 + 1.5**2) / 4 / 2
    loss, _ = learner.loss((PAIRS_FIRST, PAIRS_SECOND, PAIRS_SAME))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    sx, sy = images((0, 0), (2, 0), (0, 2)), labels(0, 0, 1)
    scores = learner.adapt(sx, sy)(images((1, 0), (0, 3)))
    expected_scores = [[-1.0, -math.sqrt(5)], [-(3 + math.sqrt(13)) / 2, -1.0]]  # minus mean Euclidean distance
    torch.testing.assert_close(scores, torch.tensor(expected_scores), **TOL)


# ----------------------------------------------------------------------------------------------- SimpleShot
def simpleshot_reference(support, support_y, query, mean, mode: str) -> list[list[float]]:
    def transform(v):
        if mode == "cl2n":
            v = [a - m for a, m in zip(v, mean)]
        if mode in ("cl2n", "l2n"):
            norm = math.sqrt(sum(a * a for a in v))
            v = [a / norm for a in v]
        return v

    s = [transform(v) for v in support]
    ways = max(support_y) + 1
    centroids = [[sum(s[i][d] for i in range(len(s)) if support_y[i] == c) / support_y.count(c)
                  for d in range(len(mean))] for c in range(ways)]
    return [[-sum((a - b) ** 2 for a, b in zip(transform(q), cen)) for cen in centroids] for q in query]


@pytest.mark.parametrize("mode", ["cl2n", "l2n", "un"])
def test_simpleshot_nearest_centroid_on_normalised_features(mode):
    learner = make("simpleshot", nn.Flatten(), 2, num_classes=2, normalize=mode)
    mean = [1.0, 1.0]
    learner.feature_mean.copy_(torch.tensor(mean))
    support, support_y = [(2, 1), (1, 3), (0, 1), (1, -2), (-3, 0.5)], [0, 0, 1, 1, 1]
    query = [(3, 2), (-1, 0.5)]
    expected = simpleshot_reference(support, support_y, query, mean, mode)
    logits = learner.adapt(images(*support), torch.tensor(support_y))(images(*query))
    torch.testing.assert_close(logits, torch.tensor(expected), **TOL)
    if mode == "cl2n":  # literal: centred, normalised class 0 is (1,0), (0,1) -> centroid (0.5, 0.5)
        q = (2 / math.sqrt(5), 1 / math.sqrt(5))
        assert logits[0, 0].item() == pytest.approx(-((q[0] - 0.5) ** 2 + (q[1] - 0.5) ** 2), abs=1e-6)


def test_simpleshot_base_mean_is_a_moving_average_and_pretraining_is_cross_entropy():
    learner = make("simpleshot", nn.Flatten(), 2, num_classes=2, mean_momentum=0.25)
    set_(learner.classifier.weight, [[1.0, -1.0], [0.5, 2.0]])
    set_(learner.classifier.bias, [0.1, -0.2])
    loss, _ = learner.loss((images((1, 2), (3, 0)), labels(1, 0)))
    torch.testing.assert_close(learner.feature_mean, torch.tensor([2.0, 1.0]))  # the first batch sets it
    logits = [[1 - 2 + 0.1, 0.5 + 4 - 0.2], [3 + 0.1, 1.5 - 0.2]]
    assert loss.item() == pytest.approx(cross_entropy(logits, [1, 0]), abs=1e-6)
    learner.loss((images((0, 0), (4, 4)), labels(0, 1)))  # batch mean (2, 2)
    torch.testing.assert_close(learner.feature_mean, torch.tensor([2.0, 1.0 + 0.25 * (2.0 - 1.0)]))


# --------------------------------------------------------------------------------------- Baseline, Baseline++
def cosine_logits(features: Tensor, weight: Tensor, scale: float) -> Tensor:
    dots = features @ weight.t()
    return scale * dots / (features.norm(dim=1, keepdim=True) * weight.norm(dim=1).unsqueeze(0))


def test_baseline_plus_plus_pretraining_head_is_scaled_cosine():
    assert make("baseline++", nn.Flatten(), 2, num_classes=200).classifier.scale == 2.0  # Chen et al.'s code
    assert make("baseline++", nn.Flatten(), 2, num_classes=201).classifier.scale == 10.0
    assert make("baseline++", nn.Flatten(), 2, num_classes=3, scale=5.0).classifier.scale == 5.0
    learner = make("baseline++", nn.Flatten(), 2, num_classes=3)
    set_(learner.classifier.weight, [[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    # f = (3, 4): cosines 0.6, 0.8, -7 / (5 sqrt 2); f = (-1, 0): -1, 0, 1 / sqrt 2; scale 2 for 3 classes.
    logits = [[2 * 0.6, 2 * 0.8, -2 * 7 / (5 * math.sqrt(2))], [-2.0, 0.0, 2 / math.sqrt(2)]]
    loss, _ = learner.loss((images((3, 4), (-1, 0)), labels(1, 2)))
    assert loss.item() == pytest.approx(cross_entropy(logits, [1, 2]), abs=1e-6)


def reference_head_fit(weight: Tensor, bias: Tensor | None, head, features: Tensor, y: Tensor, steps: int,
                       lr: float) -> tuple[Tensor, Tensor | None]:
    """Full-batch SGD with momentum 0.9, dampening 0.9 and weight decay 1e-3 (Chen et al.'s fine-tuning),
    written out: d = grad + wd p; buf = d at the first step, else 0.9 buf + 0.1 d; p -= lr buf."""
    params = [weight.clone()] + ([bias.clone()] if bias is not None else [])
    buffers: list[Tensor | None] = [None] * len(params)
    for _ in range(steps):
        leaves = [p.clone().requires_grad_() for p in params]
        loss = F.cross_entropy(head(features, *leaves), y)
        grads = torch.autograd.grad(loss, leaves)
        for k, (p, g) in enumerate(zip(params, grads)):
            d = g + 1e-3 * p
            buffers[k] = d if buffers[k] is None else 0.9 * buffers[k] + 0.1 * d
            params[k] = p - lr * buffers[k]
    return params[0], (params[1] if bias is not None else None)


SUPPORT = images((1.0, 0.5), (2.0, -1.0), (-1.0, 1.5), (-0.5, -2.0), (0.3, 0.3), (1.0, 2.0))
SUPPORT_Y = labels(0, 0, 1, 1, 2, 2)
QUERY = images((0.5, -0.5), (-1.0, -1.0), (2.0, 2.0))


@pytest.mark.parametrize("steps", [1, 3])
def test_baseline_plus_plus_adapt_fits_a_cosine_head_on_the_support_set(steps):
    learner = make("baseline++", nn.Flatten(), 2, num_classes=4, adapt_steps=steps, adapt_lr=0.5)
    initial = learner.new_head(3).weight.detach()
    weight, _ = reference_head_fit(initial, None, lambda f, w: cosine_logits(f, w, 2.0), SUPPORT.flatten(1),
                                   SUPPORT_Y, steps, 0.5)
    expected = cosine_logits(QUERY.flatten(1), weight, 2.0)
    with torch.no_grad():
        torch.testing.assert_close(learner.adapt(SUPPORT, SUPPORT_Y)(QUERY), expected, **TOL)


def test_baseline_adapt_fits_a_linear_head_on_the_support_set():
    learner = make("baseline", nn.Flatten(), 2, num_classes=4, adapt_steps=3, adapt_lr=0.5)
    initial = learner.new_head(3)
    weight, bias = reference_head_fit(initial.weight.detach(), initial.bias.detach(),
                                      lambda f, w, b: f @ w.t() + b, SUPPORT.flatten(1), SUPPORT_Y, 3, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(learner.adapt(SUPPORT, SUPPORT_Y)(QUERY), QUERY.flatten(1) @ weight.t() + bias,
                                   **TOL)


# --------------------------------------------------------------------------------- MAML, ANIL, Meta-SGD, Reptile
W0 = [[0.2, -0.4, 0.1], [-0.3, 0.5, 0.2]]
B0 = [0.1, -0.1]


def linear_tasks(count: int = 2, seed: int = 0) -> list[Episode]:
    generator = torch.Generator().manual_seed(seed)
    return [task(torch.randn(4, 1, 1, 3, generator=generator), labels(0, 1, 0, 1),
                 torch.randn(4, 1, 1, 3, generator=generator), labels(1, 0, 0, 1)) for _ in range(count)]


def softmax_regression_loss(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    logits = x @ w.t() + b
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)).mean()


def softmax_regression_grads(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form gradient of the mean cross-entropy of a linear softmax classifier: (P - Y)^T X / n."""
    residual = (torch.softmax(x @ w.t() + b, dim=1) - F.one_hot(y, w.shape[0]).to(x.dtype)) / len(y)
    return residual.t() @ x, residual.sum(0)


def sgd_steps(w: Tensor, b: Tensor, x: Tensor, y: Tensor, steps: int, lr_w, lr_b) -> tuple[Tensor, Tensor]:
    """theta <- theta - alpha * grad L_support(theta), `steps` times (alpha a number or per entry)."""
    for _ in range(steps):
        gw, gb = softmax_regression_grads(w, b, x, y)
        w, b = w - lr_w * gw, b - lr_b * gb
    return w, b


def linear_learner(name: str, **options) -> nn.Module:
    learner = make(name, nn.Flatten(), 3, ways=2, **options)
    set_(learner.head.weight, W0)
    set_(learner.head.bias, B0)
    return learner


@pytest.mark.parametrize("steps, lr", [(None, None), (2, 0.1)])
def test_maml_adapt_is_theta_minus_alpha_grad_of_the_support_loss(steps, lr):
    learner = linear_learner("maml", inner_steps=1, inner_lr=0.5, test_inner_steps=steps, test_inner_lr=lr)
    episode = linear_tasks(1)[0]
    x, qx = episode.support_x.flatten(1), episode.query_x.flatten(1)
    w, b = sgd_steps(torch.tensor(W0), torch.tensor(B0), x, episode.support_y, steps or 1, lr or 0.5, lr or 0.5)
    with torch.no_grad():
        predictions = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
    torch.testing.assert_close(predictions, qx @ w.t() + b, **TOL)
    torch.testing.assert_close(learner.head.weight, torch.tensor(W0), atol=0, rtol=0)  # adapt changes a copy


def maml_reference(tasks: list[Episode], steps: int, lr: float, first_order: bool) -> tuple[float, Tensor, Tensor]:
    """Meta-loss and its gradient: second order through the closed-form inner steps by torch.autograd; first
    order, the query gradient at the adapted weights (the inner steps taken as constants)."""
    w, b = torch.tensor(W0, requires_grad=True), torch.tensor(B0, requires_grad=True)
    losses, first = [], [torch.zeros(2, 3), torch.zeros(2)]
    for t in tasks:
        x, qx = t.support_x.flatten(1), t.query_x.flatten(1)
        w1, b1 = sgd_steps(w, b, x, t.support_y, steps, lr, lr)
        losses.append(softmax_regression_loss(w1, b1, qx, t.query_y))
        gw, gb = softmax_regression_grads(w1.detach(), b1.detach(), qx, t.query_y)
        first[0], first[1] = first[0] + gw / len(tasks), first[1] + gb / len(tasks)
    meta_loss = torch.stack(losses).mean()
    if first_order:
        return meta_loss.item(), first[0], first[1]
    gw, gb = torch.autograd.grad(meta_loss, [w, b])
    return meta_loss.item(), gw, gb


def test_maml_reference_second_and_first_order_differ():
    tasks = linear_tasks()
    _, second_w, _ = maml_reference(tasks, 1, 0.5, first_order=False)
    _, first_w, _ = maml_reference(tasks, 1, 0.5, first_order=True)
    assert (second_w - first_w).abs().max() > 1e-3  # so the tests below tell the two apart


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("options", [{"strategy": "loop"}, {"strategy": "vmap"},
                                     {"strategy": "loop", "per_task_backward": True},
                                     {"strategy": "loop", "task_threads": 2},
                                     {"strategy": "loop", "inner_steps": 2}],
                         ids=["loop", "vmap", "per-task-backward", "threads", "two-steps"])
def test_maml_meta_gradient_against_hand_computed_one(first_order, options):
    steps = options.get("inner_steps", 1)
    learner = linear_learner("maml", inner_lr=0.5, first_order=first_order, **{"inner_steps": 1, **options})
    tasks = linear_tasks()
    loss, _ = learner.loss(Episode.stack(tasks))
    loss.backward()
    expected_loss, gw, gb = maml_reference(tasks, steps, 0.5, first_order)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-5)
    torch.testing.assert_close(learner.head.weight.grad, gw, **TOL)
    torch.testing.assert_close(learner.head.bias.grad, gb, **TOL)


def test_anil_adapts_only_the_head_and_meta_gradient_reaches_the_backbone():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3, 3), nn.Tanh())
    learner = make("anil", body, 3, ways=2, inner_lr=0.5, strategy="loop")
    set_(learner.head.weight, W0)
    set_(learner.head.bias, B0)
    tasks = linear_tasks()
    loss, _ = learner.loss(Episode.stack(tasks))
    loss.backward()
    w, b = torch.tensor(W0, requires_grad=True), torch.tensor(B0, requires_grad=True)
    body_params = list(body.parameters())
    losses = []
    for t in tasks:
        features, query = body(t.support_x), body(t.query_x)
        w1, b1 = sgd_steps(w, b, features, t.support_y, 1, 0.5, 0.5)  # the backbone is not adapted
        losses.append(softmax_regression_loss(w1, b1, query, t.query_y))
    meta_loss = torch.stack(losses).mean()
    expected = torch.autograd.grad(meta_loss, [w, b, *body_params])
    assert loss.item() == pytest.approx(meta_loss.item(), abs=1e-5)
    got = [learner.head.weight.grad, learner.head.bias.grad, *(p.grad for p in body_params)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TOL)
    with torch.no_grad():
        w1, b1 = sgd_steps(torch.tensor(W0), torch.tensor(B0), body(tasks[0].support_x), tasks[0].support_y, 1,
                           0.5, 0.5)
        predictions = learner.adapt(tasks[0].support_x, tasks[0].support_y)(tasks[0].query_x)
        torch.testing.assert_close(predictions, body(tasks[0].query_x) @ w1.t() + b1, **TOL)


def test_metasgd_inner_step_uses_learned_per_entry_rates_and_trains_them():
    learner = linear_learner("metasgd", inner_lr=0.5, strategy="loop")
    lr_w = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    lr_b = torch.tensor([0.7, 0.05])
    rates = dict(learner.learned_lrs.items())
    assert set(rates) == {"head__weight", "head__bias"}
    torch.testing.assert_close(rates["head__weight"].detach(), torch.full((2, 3), 0.5))  # start at inner_lr
    set_(rates["head__weight"], lr_w)
    set_(rates["head__bias"], lr_b)
    tasks = linear_tasks()
    loss, _ = learner.loss(Episode.stack(tasks))
    loss.backward()
    w, b = torch.tensor(W0, requires_grad=True), torch.tensor(B0, requires_grad=True)
    aw, ab = lr_w.clone().requires_grad_(), lr_b.clone().requires_grad_()
    losses = []
    for t in tasks:
        w1, b1 = sgd_steps(w, b, t.support_x.flatten(1), t.support_y, 1, aw, ab)  # theta - alpha (.) grad
        losses.append(softmax_regression_loss(w1, b1, t.query_x.flatten(1), t.query_y))
    expected = torch.autograd.grad(torch.stack(losses).mean(), [w, b, aw, ab])
    got = [learner.head.weight.grad, learner.head.bias.grad, rates["head__weight"].grad, rates["head__bias"].grad]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TOL)
    episode = tasks[0]
    w1, b1 = sgd_steps(torch.tensor(W0), torch.tensor(B0), episode.support_x.flatten(1), episode.support_y, 1,
                       lr_w, lr_b)
    with torch.no_grad():
        predictions = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
    torch.testing.assert_close(predictions, episode.query_x.flatten(1) @ w1.t() + b1, **TOL)


def adam_steps(w: Tensor, b: Tensor, x: Tensor, y: Tensor, steps: int, lr: float) -> tuple[Tensor, Tensor]:
    """Adam with beta1 = 0, beta2 = 0.999, eps = 1e-8 (Reptile's inner optimiser), written out."""
    params, second = [w, b], [torch.zeros_like(w), torch.zeros_like(b)]
    for t in range(1, steps + 1):
        grads = softmax_regression_grads(params[0], params[1], x, y)
        for k, g in enumerate(grads):
            second[k] = 0.999 * second[k] + 0.001 * g * g
            params[k] = params[k] - lr * g / ((second[k] / (1 - 0.999**t)).sqrt() + 1e-8)
    return params[0], params[1]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_surrogate_gradient_is_theta_minus_mean_adapted_theta(optimizer):
    learner = linear_learner("reptile", inner_optimizer=optimizer, inner_steps=2, inner_lr=0.3)
    tasks = linear_tasks()
    loss, _ = learner.loss(Episode.stack(tasks))
    loss.backward()
    w, b = torch.tensor(W0), torch.tensor(B0)
    adapted = [sgd_steps(w, b, t.support_x.flatten(1), t.support_y, 2, 0.3, 0.3) if optimizer == "sgd"
               else adam_steps(w, b, t.support_x.flatten(1), t.support_y, 2, 0.3) for t in tasks]
    expected_loss = sum(0.5 * (((w - w1) ** 2).sum() + ((b - b1) ** 2).sum()) for w1, b1 in adapted) / 2
    assert loss.item() == pytest.approx(float(expected_loss), abs=1e-6)
    torch.testing.assert_close(learner.head.weight.grad, w - sum(w1 for w1, _ in adapted) / 2, **TOL)
    torch.testing.assert_close(learner.head.bias.grad, b - sum(b1 for _, b1 in adapted) / 2, **TOL)


def test_reptile_adapt_fine_tunes_on_the_support_set():
    learner = linear_learner("reptile", inner_optimizer="sgd", inner_lr=0.3, test_inner_steps=3, test_inner_lr=0.2)
    episode = linear_tasks(1)[0]
    w, b = sgd_steps(torch.tensor(W0), torch.tensor(B0), episode.support_x.flatten(1), episode.support_y, 3, 0.2,
                     0.2)
    with torch.no_grad():
        predictions = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
    torch.testing.assert_close(predictions, episode.query_x.flatten(1) @ w.t() + b, **TOL)
