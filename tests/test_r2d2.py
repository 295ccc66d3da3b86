"""R2-D2 (Bertinetto et al. 2019) against its formula: the Woodbury closed form equals an independently computed
ridge solution, predictions ignore support order, gradients reach lambda, alpha and the backbone (not beta, a
shift that softmax ignores), a meta-batch's loss is the mean of its tasks' losses, a short run lowers the loss."""

from __future__ import annotations

import math
from itertools import islice

import torch
import torch.nn.functional as F
from conftest import losses_before_and_after_training, synthetic_dataset
from torch import nn

from kshot.episode import Episode
from kshot.learners import build_learner
from kshot.learners.base import EpisodeShape
from kshot.learners.r2d2 import R2D2, ridge_weights


def test_woodbury_weights_equal_the_augmented_least_squares_solution():
    # Ridge regression is least squares on [X; sqrt(lambda) I] W = [Y; 0]; solved by lstsq in float64.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=generator, dtype=torch.float64)  # M=4 < D=7: the Woodbury case
    y = F.one_hot(torch.tensor([0, 2, 1, 2]), 3).double()
    lam = 0.3
    augmented_x = torch.cat([x, math.sqrt(lam) * torch.eye(7, dtype=torch.float64)])
    augmented_y = torch.cat([y, torch.zeros(7, 3, dtype=torch.float64)])
    expected = torch.linalg.lstsq(augmented_x, augmented_y).solution
    torch.testing.assert_close(ridge_weights(x, y, lam), expected, atol=1e-10, rtol=1e-10)
    primal = torch.linalg.solve(x.T @ x + lam * torch.eye(7, dtype=torch.float64), x.T @ y)
    torch.testing.assert_close(ridge_weights(x.float(), y.float(), lam, double=True), primal.float())
    # Batched: each task solved on its own.
    stacked = ridge_weights(torch.stack([x, 2 * x]), torch.stack([y, y]), lam)
    torch.testing.assert_close(stacked[1], ridge_weights(2 * x, y, lam))


def test_logits_are_scale_times_query_weights_plus_bias():
    learner = R2D2(nn.Flatten(), (1, 1, 3), lambda_init=0.5, scale_init=2.0, bias_init=-1.0)
    sx = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).reshape(2, 1, 1, 3)
    sy = torch.tensor([0, 1])
    qx = torch.tensor([[1.0, 1, 1]]).reshape(1, 1, 1, 3)
    # X X^T = I, so W = X^T Y / 1.5 = rows e1/1.5, e2/1.5; x_q W = (1/1.5, 1/1.5); logits 2 * 2/3 - 1 = 1/3.
    logits = learner.adapt(sx, sy)(qx)
    torch.testing.assert_close(logits, torch.full((1, 2), 1 / 3), atol=1e-6, rtol=0)


def random_task(generator: torch.Generator, ways: int = 3, shots: int = 2, queries: int = 2, dim: int = 5) -> Episode:
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    return Episode(torch.randn(len(sy), 1, 1, dim, generator=generator), sy,
                   torch.randn(len(qy), 1, 1, dim, generator=generator), qy, torch.arange(ways))


def test_predictions_do_not_depend_on_support_order():
    task = random_task(torch.Generator().manual_seed(1))
    learner = R2D2(nn.Flatten(), (1, 1, 5), lambda_init=0.1, scale_init=1.0)
    reference = learner.adapt(task.support_x, task.support_y)(task.query_x)
    order = torch.randperm(len(task.support_y), generator=torch.Generator().manual_seed(2))
    shuffled = learner.adapt(task.support_x[order], task.support_y[order])(task.query_x)
    torch.testing.assert_close(shuffled, reference, atol=1e-5, rtol=1e-5)


def test_gradients_reach_lambda_scale_and_backbone_but_not_the_softmax_invariant_bias():
    torch.manual_seed(0)
    learner = R2D2(nn.Sequential(nn.Flatten(), nn.Linear(5, 4)), (1, 1, 5), scale_init=1.0, lambda_init=1.0)
    loss, metrics = learner.loss(random_task(torch.Generator().manual_seed(3)))
    loss.backward()
    assert 0 <= metrics["accuracy"] <= 100
    parameters = dict(learner.named_parameters())
    for name in ("log_lambda", "scale", "backbone.1.weight", "backbone.1.bias"):
        assert parameters[name].grad is not None and bool(parameters[name].grad.abs().sum() > 0), name
    # beta shifts every logit equally, which softmax cross-entropy ignores: its gradient is zero (up to rounding).
    assert abs(float(parameters["bias"].grad)) < 1e-6


def test_fixed_lambda_is_a_buffer_holding_log_lambda():
    learner = R2D2(nn.Flatten(), (1, 1, 5), lambda_init=2.0, learn_lambda=False)
    assert "log_lambda" not in dict(learner.named_parameters())
    assert math.isclose(float(learner.log_lambda.exp()), 2.0, rel_tol=1e-6)


def test_meta_batch_loss_is_the_mean_of_the_task_losses():
    generator = torch.Generator().manual_seed(4)
    tasks = [random_task(generator) for _ in range(3)]
    learner = R2D2(nn.Flatten(), (1, 1, 5), lambda_init=0.2, scale_init=1.5, bias_init=0.1)
    batch = Episode(*(torch.stack([getattr(t, f) for t in tasks])
                      for f in ("support_x", "support_y", "query_x", "query_y", "classes")))
    meta, _ = learner.loss(batch)
    singles = [learner.loss(t)[0] for t in tasks]
    torch.testing.assert_close(meta, torch.stack(singles).mean(), atol=1e-6, rtol=1e-6)


def test_short_training_run_lowers_the_loss():
    dataset = synthetic_dataset(classes=12, per_class=8, size=12, seed=0)
    torch.manual_seed(0)
    learner = build_learner("r2d2", (1, 12, 12), {"name": "conv4", "hidden": 8, "depth": 3},
                            {"scale_init": 1.0, "lambda_init": 1.0})
    stream = learner.training_stream(dataset, EpisodeShape(5, 2, 3, meta_batch=2), seed=0)
    batches = list(islice(stream, 8))
    before, after = losses_before_and_after_training(learner, batches, epochs=5, lr=0.01)
    assert after < 0.8 * before
