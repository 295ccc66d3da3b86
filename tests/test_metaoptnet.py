"""MetaOptNet-SVM (Lee et al. 2019) and its batched QP solver: solutions against exhaustive active-set enumeration
(an independent exact method for tiny QPs), KKT conditions, float32 against float64, implicit gradients against
finite differences (gradcheck), batched against per-task solves; the Crammer-Singer dual against its primal
(equal objectives at the optimum, margins met on separable data); the learner's logits, iteration counts, label
smoothing, meta-batch loss and a short training run."""

from __future__ import annotations

import itertools
from itertools import islice

import pytest
import torch
import torch.nn.functional as F
from conftest import losses_before_and_after_training, synthetic_dataset
from torch import nn

from kshot.episode import Episode
from kshot.learners import build_learner
from kshot.learners.base import EpisodeShape
from kshot.learners.metaoptnet import MetaOptNet, crammer_singer_qp, smoothed_cross_entropy, svm_weights
from kshot.learners.qp import interior_point, solve_qp

F64 = torch.float64


def random_qp(seed: int, n: int = 4, m: int = 5, equality: bool = True, identity: bool = False):
    """A strictly convex QP whose unconstrained optimum violates two of its inequalities (so that some are
    active at the solution and some not): Q, p, G (None for the identity), h, A, b in float64."""
    generator = torch.Generator().manual_seed(seed)
    L = torch.randn(n, n, generator=generator, dtype=F64)
    Q = L @ L.T + 0.1 * torch.eye(n, dtype=F64)
    p = torch.randn(n, generator=generator, dtype=F64)
    free = torch.linalg.solve(Q, -p)
    G = None if identity else torch.randn(m, n, generator=generator, dtype=F64)
    m = n if identity else m
    offsets = torch.tensor([-0.5, -0.3] + [1.0] * (m - 2), dtype=F64)
    h = (free if identity else G @ free) + offsets
    A = torch.randn(1, n, generator=generator, dtype=F64) if equality else None
    b = A @ free + 0.1 if equality else None
    return Q, p, G, h, A, b


def enumerate_active_sets(Q, p, G, h, A=None, b=None):
    """The exact solution of a tiny strictly convex QP: among all subsets of inequalities taken as equalities,
    the one whose KKT solution is feasible with non-negative multipliers (unique for strictly convex QPs)."""
    n = Q.shape[0]
    G = torch.eye(n, dtype=Q.dtype) if G is None else G
    found = []
    for k in range(G.shape[0] + 1):
        for active in itertools.combinations(range(G.shape[0]), k):
            rows = [G[list(active)]] + ([A] if A is not None else [])
            targets = [h[list(active)]] + ([b] if b is not None else [])
            E, e = torch.cat(rows), torch.cat(targets)
            kkt = torch.zeros(n + len(e), n + len(e), dtype=Q.dtype)
            kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = Q, E.T, E
            if torch.linalg.matrix_rank(kkt) < len(kkt):
                continue
            solution = torch.linalg.solve(kkt, torch.cat([-p, e]))
            z, multipliers = solution[:n], solution[n:n + k]
            if bool((G @ z <= h + 1e-9).all()) and bool((multipliers >= -1e-9).all()):
                found.append(z)
    assert found, "no feasible active set"
    return found[0]


def batch(*tensors):
    return tuple(None if t is None else t.unsqueeze(0) for t in tensors)


# ------------------------------------------------------------------------------------------------ QP solver
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["general", "identity"])
def test_qp_solution_equals_exhaustive_active_set_enumeration_and_meets_kkt(seed, kind):
    Q, p, G, h, A, b = random_qp(seed, equality=kind == "general", identity=kind == "identity")
    expected = enumerate_active_sets(Q, p, G, h, A, b)
    solution = interior_point(*batch(Q, p, G, h, A, b), max_iter=50)
    assert solution.iterations < 50  # stopped on convergence
    z, s, lam = solution.z[0], solution.s[0], solution.lam[0]
    torch.testing.assert_close(z, expected, atol=1e-9, rtol=0)
    Gm = torch.eye(4, dtype=F64) if G is None else G
    stationarity = Q @ z + p + Gm.T @ lam + (A.T @ solution.nu[0] if A is not None else 0)
    assert stationarity.abs().max() < 1e-9
    assert (Gm @ z + s - h).abs().max() < 1e-9 and bool((s >= 0).all()) and bool((lam >= 0).all())
    assert (s * lam).max() < 1e-9  # complementary slackness
    assert bool(((lam > 1e-6) & (s < 1e-6)).any()) and bool((s > 1e-3).any())  # some active, some not
    # float32: the same answer to float32 accuracy; a capped solve is near it.
    single = solve_qp(*(None if t is None else t.float() for t in (Q, p, G, h, A, b)), max_iter=30)
    torch.testing.assert_close(single.double(), expected, atol=2e-4, rtol=0)
    assert interior_point(*batch(Q, p, G, h, A, b), max_iter=3).iterations == 3  # a cap, as in MetaOptNet


def test_qp_gradients_equal_finite_differences():
    Q, p, G, h, A, b = random_qp(2)  # two active inequalities and one equality: z still depends on Q and p
    L = torch.linalg.cholesky(Q - 0.1 * torch.eye(4, dtype=F64))

    def solve(L, p, G, h, A, b):  # Q through a factor, so that every perturbation keeps it symmetric
        return solve_qp(L @ L.T + 0.1 * torch.eye(4, dtype=F64), p, G, h, A, b, max_iter=60)

    inputs = tuple(t.clone().requires_grad_() for t in (L, p, G, h, A, b))
    assert torch.autograd.gradcheck(solve, inputs, atol=1e-5, rtol=1e-4, fast_mode=True)
    Q, p, _, h, _, _ = random_qp(1, equality=False, identity=True)  # two active bounds
    L = torch.linalg.cholesky(Q - 0.1 * torch.eye(4, dtype=F64))
    inputs = tuple(t.clone().requires_grad_() for t in (L, p, h))
    assert torch.autograd.gradcheck(lambda L, p, h: solve(L, p, None, h, None, None), inputs, atol=1e-5, rtol=1e-4,
                                    fast_mode=True)


def test_batched_qps_equal_per_task_solves_values_and_gradients():
    problems = [random_qp(seed) for seed in range(3)]
    stacked = [torch.stack([problem[i] for problem in problems]).requires_grad_() for i in range(6)]
    together = solve_qp(*stacked, max_iter=40)
    (together * torch.arange(1.0, 5.0, dtype=F64)).sum().backward()
    for task, problem in enumerate(problems):
        alone_inputs = [t.clone().requires_grad_() for t in problem]
        alone = solve_qp(*alone_inputs, max_iter=40)
        (alone * torch.arange(1.0, 5.0, dtype=F64)).sum().backward()
        torch.testing.assert_close(together[task], alone, atol=1e-10, rtol=0)
        for shared, single in zip(stacked, alone_inputs):
            torch.testing.assert_close(shared.grad[task], single.grad, atol=1e-8, rtol=1e-6)


def test_qp_inputs_are_checked():
    Q, p, G, h, A, b = random_qp(0)
    with pytest.raises(ValueError, match="give A and b together"):
        solve_qp(Q, p, G, h, A, None)
    with pytest.raises(ValueError, match="max_iter must be at least 1"):
        solve_qp(Q, p, G, h, max_iter=0)
    with pytest.raises(ValueError, match="QP shapes disagree"):
        solve_qp(Q, p[:3], G, h)


# ----------------------------------------------------------------------------------------- Crammer-Singer SVM
def svm_task(seed: int, ways: int = 3, shots: int = 3, dim: int = 12, spread: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(ways, dim, generator=generator, dtype=F64)
    labels = torch.arange(ways).repeat_interleave(shots)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator, dtype=F64)
    return features, labels


def primal_objective(W, features, labels, C):
    """1/2 |W|^2 + C sum_i max_m (1 - [m = y_i] + w_m.x_i - w_{y_i}.x_i): the Crammer-Singer primal."""
    scores = features @ W
    one_hot = F.one_hot(labels, W.shape[1]).to(W.dtype)
    slack = (1 - one_hot + scores - (scores * one_hot).sum(-1, keepdim=True)).amax(-1)
    return 0.5 * W.pow(2).sum() + C * slack.sum()


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_svm_dual_optimum_equals_the_primal_optimum(C):
    features, labels = svm_task(0, spread=2.0)  # overlapping classes: some slack at C = 1
    Q, p, h, A, b = crammer_singer_qp(features[None], labels[None], 3, C)
    alpha = solve_qp(Q, p, None, h, A, b, max_iter=60)[0]
    # Dual feasibility: alpha_i^m <= C [m = y_i], sum_m alpha_i^m = 0.
    assert bool((alpha <= h[0] + 1e-9).all()) and (alpha.reshape(9, 3).sum(-1).abs().max() < 1e-9)
    W = svm_weights(features[None], labels[None], 3, C, max_iter=60)[0]
    torch.testing.assert_close(W, features.T @ alpha.reshape(9, 3))
    dual_minimum = 0.5 * alpha @ Q[0] @ alpha + p[0] @ alpha
    # Weak duality makes primal(W) >= -dual for any feasible pair: equality proves both optimal.
    torch.testing.assert_close(primal_objective(W, features, labels, C), -dual_minimum, atol=1e-8, rtol=1e-8)


def test_svm_on_separable_data_meets_every_margin():
    features, labels = svm_task(1, spread=0.2)
    W = svm_weights(features[None], labels[None], 3, C=100.0, max_iter=60)[0]  # large C: the hard margin
    scores = features @ W
    true = scores.gather(1, labels[:, None])
    margins = (true - scores).masked_fill(F.one_hot(labels, 3).bool(), float("inf")).amin(-1)
    assert margins.min() > 1 - 1e-7
    assert margins.min() < 1 + 1e-6  # the margin is tight for a support vector


def test_svm_batched_equals_per_task_and_ridge_is_on_the_diagonal():
    tasks = [svm_task(seed) for seed in range(3)]
    features = torch.stack([f for f, _ in tasks])
    labels = torch.stack([y for _, y in tasks])
    together = svm_weights(features, labels, 3, 0.1, ridge=1.0, max_iter=40)
    for i, (f, y) in enumerate(tasks):
        torch.testing.assert_close(together[i], svm_weights(f[None], y[None], 3, 0.1, 1.0, max_iter=40)[0])
    Q0 = crammer_singer_qp(features, labels, 3, 0.1)[0]
    Q1 = crammer_singer_qp(features, labels, 3, 0.1, ridge=1.0)[0]
    torch.testing.assert_close(Q1 - Q0, torch.eye(27, dtype=F64).expand(3, 27, 27))
    # Q is K kron I: alpha_i^m and alpha_j^n interact through x_i.x_j when m = n only.
    assert Q0[0, 0 * 3 + 1, 4 * 3 + 1] == features[0, 0] @ features[0, 4] and Q0[0, 1, 4 * 3 + 2] == 0


def test_double_solve_returns_the_input_dtype_and_agrees():
    features, labels = svm_task(2)
    single = svm_weights(features.float()[None], labels[None], 3, 0.1, 1.0, max_iter=15)
    double = svm_weights(features.float()[None], labels[None], 3, 0.1, 1.0, max_iter=15, double=True)
    assert single.dtype == double.dtype == torch.float32
    torch.testing.assert_close(single, double, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- the learner
def episode(generator: torch.Generator, ways: int = 3, shots: int = 2, queries: int = 2, dim: int = 6) -> Episode:
    sy, qy = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)
    return Episode(torch.randn(len(sy), 1, 1, dim, generator=generator), sy,
                   torch.randn(len(qy), 1, 1, dim, generator=generator), qy, torch.arange(ways))


def test_logits_are_scale_times_query_features_times_svm_weights():
    learner = MetaOptNet(nn.Flatten(), (1, 1, 6), scale_init=2.5, C_reg=0.3, dual_ridge=0.5, test_iterations=4)
    task = episode(torch.Generator().manual_seed(0))
    logits = learner.adapt(task.support_x, task.support_y)(task.query_x)
    weights = svm_weights(task.support_x.flatten(1)[None], task.support_y[None], 3, 0.3, 0.5, max_iter=4)[0]
    torch.testing.assert_close(logits, 2.5 * task.query_x.flatten(1) @ weights)


def test_training_and_adaptation_use_their_own_iteration_counts(monkeypatch):
    import kshot.learners.metaoptnet as module

    seen = []
    solve = module.solve_qp
    monkeypatch.setattr(module, "solve_qp", lambda *a, **kw: seen.append(kw["max_iter"]) or solve(*a, **kw))
    learner = MetaOptNet(nn.Flatten(), (1, 1, 6))
    assert (learner.options["train_iterations"], learner.options["test_iterations"]) == (15, 3)  # authors' code
    task = episode(torch.Generator().manual_seed(1))
    learner.loss(task)
    learner.adapt(task.support_x, task.support_y)
    assert seen == [15, 3]


def test_label_smoothing_is_the_authors_formula():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    target = torch.full((6, 5), 0.1 / 4).scatter(1, labels[:, None], 0.9)  # train.py: eps / (N - 1) elsewhere
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, 0.1), expected)
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, 0.0), F.cross_entropy(logits, labels))


def test_gradients_reach_scale_and_backbone_and_meta_batch_loss_is_the_task_mean():
    torch.manual_seed(0)
    learner = MetaOptNet(nn.Sequential(nn.Flatten(), nn.Linear(6, 5)), (1, 1, 6))
    generator = torch.Generator().manual_seed(3)
    tasks = [episode(generator) for _ in range(3)]
    loss, metrics = learner.loss(tasks[0])
    loss.backward()
    assert 0 <= metrics["accuracy"] <= 100
    for name, parameter in learner.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
    meta = learner.loss(Episode.stack(tasks))[0]
    torch.testing.assert_close(meta, torch.stack([learner.loss(t)[0] for t in tasks]).mean(), atol=1e-5, rtol=1e-5)


def test_short_training_run_lowers_the_loss():
    dataset = synthetic_dataset(classes=12, per_class=8, size=12, seed=0)
    torch.manual_seed(0)
    learner = build_learner("metaoptnet", (1, 12, 12), {"name": "conv4", "hidden": 8, "depth": 3},
                            {"train_iterations": 5})
    batches = list(islice(learner.training_stream(dataset, EpisodeShape(5, 2, 3, meta_batch=2), seed=0), 4))
    before, after = losses_before_and_after_training(learner, batches, epochs=5, lr=0.01)
    assert after < 0.8 * before
