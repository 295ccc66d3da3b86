"""Evaluation: the confidence interval formula, batch-norm modes, and scoring on fixed episodes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import synthetic_dataset
from torch import nn

from kshot.batchnorm import batchnorm_mode
from kshot.data import EpisodeSet
from kshot.evaluation import evaluate, mean_ci95, query_accuracy
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


# ------------------------------------------------------------------ batched evaluation of works_on_features learners
def trained_protonet(shape=(1, 16, 16)) -> Learner:
    """A tiny Conv-4 ProtoNet whose batch-norm running statistics are not the initial ones, so that inference
    mode (running statistics) and batch statistics would give different features."""
    torch.manual_seed(0)
    learner = build_learner("protonet", shape, {"name": "conv4", "hidden": 8})
    generator = torch.Generator().manual_seed(1)
    for layer in learner.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
    return learner


def recorded_evaluation(learner: Learner, episodes: EpisodeSet, **options):
    """evaluate(), and every episode's output as the metric saw it."""
    outputs = []

    def metric(output, target):
        outputs.append(output.clone())
        return query_accuracy(output, target)

    return evaluate(learner, episodes, progress=False, metric=metric, **options), outputs


def episode_by_episode(learner: Learner, episodes: EpisodeSet, **options):
    """The per-episode path (adapt on each episode's images), forced by hiding works_on_features."""
    learner.works_on_features = False
    try:
        return recorded_evaluation(learner, episodes, **options)
    finally:
        del learner.works_on_features


@pytest.mark.parametrize("per_batch", [1, 3, None])
@pytest.mark.parametrize("fast_backbone", [False, True])
def test_batched_evaluation_scores_every_episode_as_the_per_episode_path(per_batch, fast_backbone):
    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    learner = trained_protonet()
    episodes = EpisodeSet(data, 4, 2, 3, 7, seed=3)  # 7 episodes: chunks of 3 leave a chunk of 1
    reference, reference_outputs = episode_by_episode(learner, episodes)
    result, outputs = recorded_evaluation(learner, episodes, episodes_per_batch=per_batch,
                                          fast_backbone=fast_backbone)
    assert len(outputs) == len(reference_outputs) == 7
    for output, expected in zip(outputs, reference_outputs, strict=True):
        assert output.shape == (12, 4)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    assert result.per_episode == reference.per_episode and result.accuracy == reference.accuracy
    assert result.ece == pytest.approx(reference.ece, abs=1e-5)  # percent; confidences differ by float rounding
    assert result.episode_ece == pytest.approx(reference.episode_ece, abs=1e-5)
    assert (result.episodes, result.ways, result.shots, result.queries) == (7, 4, 2, 3)


def backbone_batches(learner: Learner, episodes: EpisodeSet, **options) -> list[int]:
    """How many images each backbone call of an evaluation took."""
    sizes: list[int] = []
    handle = learner.backbone.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    try:
        evaluate(learner, episodes, progress=False, **options)
    finally:
        handle.remove()
    return sizes


def test_inference_mode_embeds_chunks_of_episodes_and_transductive_mode_each_episode():
    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    learner = trained_protonet()
    episodes = EpisodeSet(data, 4, 2, 3, 5, seed=0)  # 20 images an episode
    assert backbone_batches(learner, episodes, episodes_per_batch=2) == [40, 40, 20]
    assert backbone_batches(learner, episodes) == [100]  # the default budget holds all five
    # Transductive batch norm: the features of an image depend on its batch, so support, then queries, per episode.
    assert backbone_batches(learner, episodes, bn_mode="transductive", episodes_per_batch=2) == [8, 12] * 5


def test_a_chunk_larger_than_the_budget_is_embedded_in_passes_with_the_same_results(monkeypatch):
    from kshot.evaluation import EMBED_BUDGET

    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    learner = trained_protonet()
    episodes = EpisodeSet(data, 4, 2, 3, 3, seed=0)  # 20 images an episode
    reference, reference_outputs = episode_by_episode(learner, episodes)
    monkeypatch.setitem(EMBED_BUDGET, "cpu", 7 * 16 * 16)  # 7 images a pass: less than one episode
    assert backbone_batches(learner, episodes, episodes_per_batch=2) == [7, 7, 7, 7, 7, 5, 7, 7, 6]
    result, outputs = recorded_evaluation(learner, episodes)  # default: one episode at a time
    for output, expected in zip(outputs, reference_outputs, strict=True):
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    assert result.per_episode == reference.per_episode


def test_default_chunk_follows_the_image_budget():
    from kshot.evaluation import EMBED_BUDGET, default_episodes_per_batch

    omniglot_like = synthetic_dataset(classes=25, per_class=16, size=28)
    cpu = torch.device("cpu")
    assert default_episodes_per_batch(EpisodeSet(omniglot_like, 5, 1, 15, 2), cpu) == 8
    assert default_episodes_per_batch(EpisodeSet(omniglot_like, 20, 1, 15, 2), cpu) == 2
    large = synthetic_dataset(classes=6, per_class=16, size=90, channels=3)
    assert default_episodes_per_batch(EpisodeSet(large, 5, 1, 15, 2), cpu) == 1  # never less than one episode
    assert EMBED_BUDGET["cpu"] == 640 * 28 * 28


class MeanCentred(Learner):
    """A transductive toy learner: logits are distances to class means after subtracting the mean of the whole
    query set given, so each prediction depends on every query of its episode (and on no other episode)."""

    name = "mean-centred"
    works_on_features = True
    transductive = True

    def loss(self, batch):
        raise NotImplementedError

    def adapt(self, support_x, support_y):
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support, support_y):
        ways = int(support_y.max()) + 1
        means = torch.stack([support[support_y == c].mean(0) for c in range(ways)])

        def predict(query):
            assert len(query) == self.expected_queries, "a transductive predictor needs its whole query set"
            centred = query - query.mean(0)
            return -torch.cdist(centred, means - means.mean(0))

        return predict


def test_a_transductive_predictor_receives_exactly_its_episode_query_set():
    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    torch.manual_seed(0)
    learner = MeanCentred(nn.Sequential(nn.Flatten(), nn.Linear(256, 6)), (1, 16, 16))
    learner.expected_queries = 3 * 4
    episodes = EpisodeSet(data, 3, 1, 4, 5, seed=1)
    reference, reference_outputs = episode_by_episode(learner, episodes)
    result, outputs = recorded_evaluation(learner, episodes, episodes_per_batch=2)
    for output, expected in zip(outputs, reference_outputs, strict=True):
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    assert result.per_episode == reference.per_episode and result.transductive


def test_the_backbone_given_is_untouched_and_one_whose_fast_copy_fails_is_used_as_it_is():
    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    learner = trained_protonet()
    backbone = learner.backbone
    before = {name: (value.clone(), value.stride(), value.data_ptr()) for name, value in backbone.state_dict().items()}
    evaluate(learner, EpisodeSet(data, 3, 1, 2, 2), progress=False)
    assert learner.backbone is backbone
    for name, value in backbone.state_dict().items():
        saved, stride, pointer = before[name]
        assert torch.equal(value, saved) and value.stride() == stride and value.data_ptr() == pointer, name

    class ViewingBackbone(nn.Module):  # `.view` of a feature map: fails on the fast copy's channels-last maps
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))

        def forward(self, x):
            out = self.conv(x)
            return out.view(len(out), -1)

    torch.manual_seed(0)
    viewing = build_learner("protonet", (1, 16, 16), ViewingBackbone())
    with pytest.raises(RuntimeError, match="view"):  # what the fast copy would do on its own
        from kshot.inference import inference_backbone

        inference_backbone(viewing.backbone.eval(), channels_last=True)(torch.rand(2, 1, 16, 16))
    episodes = EpisodeSet(data, 3, 1, 2, 3)
    expected = evaluate(viewing, episodes, progress=False, fast_backbone=False)
    assert evaluate(viewing, episodes, progress=False).per_episode == expected.per_episode
    assert isinstance(viewing.backbone, ViewingBackbone)


def test_episode_set_gather_is_the_episodes_in_one_meta_batch():
    data = synthetic_dataset(classes=10, per_class=6, size=8, seed=2).with_rotations((0, 90))
    episodes = EpisodeSet(data, 3, 2, 2, 6, seed=4)
    batch = episodes.gather([4, 1, 5])
    assert batch.support_x.shape == (3, 6, 1, 8, 8) and batch.query_x.shape == (3, 6, 1, 8, 8)
    for task, index in zip(batch.unbind(), [4, 1, 5], strict=True):
        single = episodes[index]
        for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
            assert torch.equal(getattr(task, name), getattr(single, name)), name
    with pytest.raises(IndexError, match="episode 6 out of range for a set of 6"):
        episodes.gather([0, 6])
    with pytest.raises(ValueError, match="non-empty"):
        episodes.gather([])


def test_episodes_per_batch_must_be_a_positive_integer():
    data = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="episodes_per_batch must be a positive integer or None"):
            evaluate(trained_protonet(), EpisodeSet(data, 3, 1, 2, 2), progress=False, episodes_per_batch=bad)
