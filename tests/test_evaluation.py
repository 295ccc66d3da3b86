"""Evaluation: the confidence interval formula, batch-norm modes, and scoring on fixed episodes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kshot.batchnorm import batchnorm_mode
from kshot.data import EpisodeSet
from kshot.evaluation import evaluate, mean_ci95
from kshot.learners import build_learner
from kshot.learners.base import Learner


def test_ci95_is_1_96_sample_std_over_sqrt_n():
    values = [0.8, 0.9, 1.0, 0.7, 0.95]
    mean, ci = mean_ci95(values)
    n = len(values)
    m = sum(values) / n
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    assert mean == pytest.approx(0.87)
    assert ci == pytest.approx(1.959964 * std / math.sqrt(n), rel=1e-6)
    assert ci == pytest.approx(0.105547, abs=1e-5)  # by hand: std 0.120416, / sqrt(5), x 1.96
    assert mean_ci95([1.0] * 10) == (1.0, 0.0)


class Oracle(Learner):
    """Predicts queries perfectly from the pixel means that the toy classes differ by (a fixture for evaluate)."""

    name = "oracle"

    def loss(self, batch):
        raise NotImplementedError

    def adapt(self, support_x, support_y):
        means = torch.stack([support_x[support_y == c].mean(0) for c in range(int(support_y.max()) + 1)])

        def predict(query_x):
            return -((query_x.unsqueeze(1) - means.unsqueeze(0)) ** 2).flatten(2).sum(-1)

        return predict


def test_evaluate_reports_percent_and_the_episode_set(toy):
    learner = Oracle(nn.Linear(1, 1), toy.image_shape)
    result = evaluate(learner, EpisodeSet(toy, 5, 2, 3, 30, seed=1), progress=False)
    assert result.episodes == 30 and len(result.per_episode) == 30
    assert result.accuracy > 95 and result.bn_mode == "inference"
    assert "5-way 2-shot" in result.summary() and "batch norm: inference" in result.summary()


def test_batchnorm_modes_leave_running_statistics_alone():
    learner = build_learner("protonet", (1, 16, 16), {"name": "conv4", "hidden": 8})  # conv4 needs 16x16
    learner.train()
    x = torch.rand(10, 1, 16, 16)
    bn = next(m for m in learner.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with batchnorm_mode(learner, "transductive"):
        assert bn.training and not learner.backbone.training
        out_transductive = learner.backbone(x)
    with batchnorm_mode(learner, "inference"):
        assert not bn.training
        out_inference = learner.backbone(x)
    assert torch.equal(bn.running_mean, before)
    assert learner.training and bn.training  # modes restored
    assert not torch.allclose(out_transductive, out_inference)
    with pytest.raises(ValueError, match="unknown batch-norm mode"):
        with batchnorm_mode(learner, "train"):
            pass
