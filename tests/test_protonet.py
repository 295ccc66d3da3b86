"""Prototypical Networks: squared Euclidean distance to class means, order invariance, learning."""

from __future__ import annotations

import torch
from conftest import synthetic_dataset

from kshot.data import EpisodeSampler
from kshot.learners import build_learner

BACKBONE = {"name": "conv4", "hidden": 8}


def test_logits_are_negative_squared_distances_to_class_means():
    learner = build_learner("protonet", (1, 16, 16), {"name": "mlp", "hidden": [6]}).eval()
    support_x, support_y = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    query_x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        logits = learner.adapt(support_x, support_y)(query_x)
        features, queries = learner.backbone(support_x), learner.backbone(query_x)
    means = torch.stack([features[support_y == c].mean(0) for c in range(3)])
    expected = -((queries[:, None, :] - means[None]) ** 2).sum(-1)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_predictions_do_not_depend_on_support_order():
    data = synthetic_dataset(size=16)
    learner = build_learner("protonet", data.image_shape, BACKBONE).eval()
    episode = EpisodeSampler(data, 4, 3, 2, seed=0).sample()
    order = torch.randperm(len(episode.support_y), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = learner.adapt(episode.support_x, episode.support_y)(episode.query_x)
        b = learner.adapt(episode.support_x[order], episode.support_y[order])(episode.query_x)
    assert torch.allclose(a, b, atol=1e-5)


def test_meta_batch_loss_is_the_mean_of_task_losses_in_eval_mode():
    data = synthetic_dataset(size=16)
    learner = build_learner("protonet", data.image_shape, BACKBONE).eval()
    batch = EpisodeSampler(data, 3, 2, 2, seed=0).sample_batch(4)
    with torch.no_grad():
        together, _ = learner.loss(batch)
        separate = torch.stack([learner.loss(task)[0] for task in batch])
    assert torch.allclose(together, separate.mean(), atol=1e-5)


def test_loss_decreases_on_a_fixed_task():
    torch.manual_seed(0)
    data = synthetic_dataset(size=16)
    learner = build_learner("protonet", data.image_shape, BACKBONE)
    episode = EpisodeSampler(data, 5, 2, 3, seed=0).sample()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, metrics = learner.loss(episode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and 0 <= metrics["accuracy"] <= 100


def test_conv4_feature_sizes():
    from kshot.backbones import Conv4
    from kshot.learners.options import feature_dim

    assert feature_dim(Conv4(), (1, 28, 28)) == 64
    assert feature_dim(Conv4(in_channels=3), (3, 84, 84)) == 1600
    maps = Conv4(flatten=False, pooled_blocks=2)(torch.zeros(2, 1, 28, 28))
    assert maps.shape == (2, 64, 7, 7)
