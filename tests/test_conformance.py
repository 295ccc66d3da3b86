"""Conformance of every registered learner to the `Learner` contract (issue 10, item 8): a trainable loss,
predictors of the right shape, support-order invariance, config and checkpoint round trips, deterministic
evaluation, and the requested batch-norm mode reaching evaluation.

The tests are parametrised over `sorted(LEARNERS)`, so a newly registered learner is covered automatically
(with the generic settings below unless it gets an entry in SPECS)."""

from __future__ import annotations

import json
import math
from itertools import islice
from typing import Any

import pytest
import torch
from conftest import synthetic_dataset
from torch import Tensor, nn

from kshot.batchnorm import batchnorm_mode
from kshot.data.sampler import EpisodeSet
from kshot.episode import Episode
from kshot.evaluation import evaluate
from kshot.learners import LEARNERS, Learner, build_learner
from kshot.learners.base import EpisodeShape
from kshot.training.checkpoint import load_learner, save_checkpoint

IMAGE_SHAPE = (1, 12, 12)
CONV = {"name": "conv4", "hidden": 8, "depth": 3}  # 12 -> 6 -> 3 -> 1: 8 features (depth 4 pools 1x1 to 0x0)
WAYS, SHOTS, QUERIES = 5, 2, 3
TRAIN_SHAPE = EpisodeShape(WAYS, SHOTS, QUERIES, meta_batch=2)

# Small, fast settings per learner; a learner without an entry gets (CONV, {}).
SPECS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "baseline": (CONV, {"batch_size": 16, "adapt_epochs": 2}),
    "baseline++": (CONV, {"batch_size": 16, "adapt_epochs": 2}),
    "matching": (CONV, {"fce": True, "processing_steps": 2}),
    "relation": ({**CONV, "flatten": False, "pooled_blocks": 2}, {"relation_channels": 8, "relation_hidden": 4}),
    "reptile": (CONV, {"inner_steps": 2, "test_inner_steps": 3, "inner_batch_size": 4, "test_inner_batch_size": 4,
                       "inner_lr": 0.01}),
    "siamese": (CONV, {"batch_size": 16}),
    "simpleshot": (CONV, {"batch_size": 16}),
    "tim": (CONV, {"batch_size": 16, "iterations": 50}),
    "bd-cspn": (CONV, {"batch_size": 16}),
    "pt-map": (CONV, {"batch_size": 16, "epochs": 3}),
    "laplacianshot": (CONV, {"batch_size": 16}),
    "maml": (CONV, {"inner_lr": 0.1, "test_inner_steps": 2}),
    "anil": (CONV, {"inner_lr": 0.1, "test_inner_steps": 2}),
    "metasgd": (CONV, {"inner_lr": 0.1, "test_inner_steps": 2}),
}

# Options that make a learner order-invariant where its own settings are order-dependent by design (none today:
# Reptile and Baseline cut their mini-batches from a canonically ordered support set, Matching's FCE reads it so).
ORDER_INVARIANT_OPTIONS: dict[str, dict[str, Any]] = {}

NAMES = sorted(LEARNERS)
DATASET = synthetic_dataset(classes=12, per_class=8, size=12, seed=0)


def build(name: str, **override: Any) -> Learner:
    """The learner `name`, prepared on DATASET, after one training step (so batch-norm running statistics and
    SimpleShot's base-class mean are not their initial values), in eval mode."""
    backbone, options = SPECS.get(name, (CONV, {}))
    torch.manual_seed(0)
    learner = build_learner(name, IMAGE_SHAPE, backbone, {**options, **override})
    learner.prepare(DATASET)
    learner.train()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05)
    loss, _ = learner.loss(training_batch(learner))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    learner.eval()
    return learner


def training_batch(learner: Learner, seed: int = 0) -> Any:
    return next(islice(learner.training_stream(DATASET, TRAIN_SHAPE, seed), 1))


def episode(seed: int = 3) -> Episode:
    return EpisodeSet(DATASET, WAYS, SHOTS, QUERIES, count=1, seed=seed)[0]


def predict(learner: Learner, task: Episode) -> Tensor:
    with torch.no_grad():
        return learner.adapt(task.support_x, task.support_y)(task.query_x)


def logit_sum(output: Tensor, target: Tensor) -> float:
    """A continuous per-episode score: any change in the logits shows, unlike accuracy."""
    return float(output.double().sum())


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_every_registered_learner_is_covered():
    assert NAMES, "no learner registered"
    assert set(SPECS) <= set(LEARNERS), f"SPECS names unregistered learners: {set(SPECS) - set(LEARNERS)}"


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_a_finite_scalar_whose_gradient_reaches_the_backbone(name):
    learner = build(name)
    learner.train()
    learner.zero_grad(set_to_none=True)
    loss, metrics = learner.loss(training_batch(learner, seed=1))
    assert isinstance(loss, Tensor) and loss.dim() == 0 and loss.requires_grad
    assert math.isfinite(loss.item())
    assert isinstance(metrics, dict) and all(math.isfinite(float(v)) for v in metrics.values())
    loss.backward()
    backbone_grads = [p.grad for p in learner.backbone.parameters() if p.requires_grad]
    assert backbone_grads and all(g is not None and bool(torch.isfinite(g).all()) for g in backbone_grads)
    assert any(bool(g.abs().sum() > 0) for g in backbone_grads), "no gradient reaches the backbone"
    for pname, p in learner.named_parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all()), pname


@pytest.mark.parametrize("name", NAMES)
def test_adapt_gives_finite_logits_of_shape_queries_by_ways(name):
    learner = build(name)
    task = episode()
    logits = predict(learner, task)
    assert logits.shape == (WAYS * QUERIES, WAYS)
    assert bool(torch.isfinite(logits).all())
    if learner.transductive:  # queries are labelled together: reordering them reorders the rows, no more
        order = torch.randperm(len(task.query_x), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            shuffled = learner.adapt(task.support_x, task.support_y)(task.query_x[order])
        torch.testing.assert_close(shuffled, logits[order], atol=1e-4, rtol=1e-4)
        return
    # Each query is scored on its own: a subset of the queries gives the same rows.
    with torch.no_grad():
        subset = learner.adapt(task.support_x, task.support_y)(task.query_x[2:9])
    torch.testing.assert_close(subset, logits[2:9], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_predictions_do_not_depend_on_support_order(name):
    # Matching with FCE reads the support set with an LSTM, in order; kshot sorts the support set into a
    # canonical order first (matching.canonical_order), so it is held to invariance too.
    learner = build(name, **ORDER_INVARIANT_OPTIONS.get(name, {}))
    task = episode()
    reference = predict(learner, task)
    for seed in range(2):
        order = torch.randperm(len(task.support_y), generator=torch.Generator().manual_seed(seed))
        shuffled = Episode(task.support_x[order], task.support_y[order], task.query_x, task.query_y, task.classes)
        logits = predict(learner, shuffled)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1))
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_rebuilds_an_identical_learner(name):
    learner = build(name)
    config = learner.config()
    assert json.loads(json.dumps(config)) == config, "config must survive JSON (checkpoints store it so)"
    rebuilt = build_learner(**config)
    assert type(rebuilt) is type(learner)
    assert rebuilt.config() == config
    assert list(rebuilt.state_dict()) == list(learner.state_dict())
    rebuilt.load_state_dict(learner.state_dict())
    rebuilt.eval()
    task = episode()
    assert torch.equal(predict(rebuilt, task), predict(learner, task))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_save_then_load_gives_the_same_predictions(name, tmp_path):
    learner = build(name)
    save_checkpoint(tmp_path / "ckpt", learner, {"step": 7})
    loaded, info = load_learner(tmp_path / "ckpt")
    assert type(loaded) is type(learner)
    assert info["step"] == 7 and info["model"] == learner.config()
    assert loaded.config() == learner.config()
    for (key, mine), theirs in zip(learner.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), key
    loaded.eval()
    task = episode()
    assert torch.equal(predict(loaded, task), predict(learner, task))


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_is_deterministic_whatever_the_global_rng(name):
    learner = build(name)
    episodes = EpisodeSet(DATASET, WAYS, SHOTS, QUERIES, count=2, seed=5)
    runs = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        accuracy = evaluate(learner, episodes, progress=False).per_episode
        torch.manual_seed(seed + 100)
        logits = evaluate(learner, episodes, progress=False, metric=logit_sum).per_episode
        runs.append((accuracy, logits))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 2


@pytest.mark.parametrize("name", NAMES)
def test_requested_bn_mode_reaches_evaluation(name):
    learner = build(name)
    layers = batchnorm_layers(learner)
    if not layers:
        pytest.skip(f"{name} as configured here has no batch norm")
    seen: list[tuple[bool, bool]] = []

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        seen.append((module.training, module.running_mean is None))

    handles = [layer.register_forward_hook(record) for layer in layers]
    stats = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    modes = [m.training for m in learner.modules()]
    episodes = EpisodeSet(DATASET, WAYS, SHOTS, QUERIES, count=1, seed=5)
    scores = {}
    try:
        for mode in ("transductive", "inference"):
            seen.clear()
            scores[mode] = evaluate(learner, episodes, bn_mode=mode, progress=False, metric=logit_sum).per_episode
            assert seen, "no batch-norm layer ran during evaluation"
            if mode == "transductive":  # batch statistics, running statistics neither used nor updated
                assert all(training and no_stats for training, no_stats in seen), seen
            else:  # running statistics
                assert not any(training or no_stats for training, no_stats in seen), seen
            assert [m.training for m in learner.modules()] == modes, "evaluation must restore module modes"
            for layer, (mean, var) in zip(layers, stats):
                assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    finally:
        for handle in handles:
            handle.remove()
    assert scores["transductive"] != scores["inference"]
    # The transductive score is what the learner gives with its batch-norm layers on batch statistics.
    with batchnorm_mode(learner, "transductive"):
        assert logit_sum(predict(learner, episodes[0]), episodes[0].query_y) == scores["transductive"][0]


def test_transductive_evaluation_leaves_every_batchnorm_buffer_alone():
    learner = build("protonet")
    before = {key: value.clone() for key, value in learner.state_dict().items()}
    evaluate(learner, EpisodeSet(DATASET, WAYS, SHOTS, QUERIES, count=2, seed=5), bn_mode="transductive",
             progress=False)
    for key, value in learner.state_dict().items():
        assert torch.equal(value, before[key]), key
