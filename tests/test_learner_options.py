"""Learner options through the one typed parser (unknown, wrong-typed and out-of-range options are one-line
ConfigErrors naming the option; config() round-trips through JSON), Reptile's and Baseline's deterministic,
order-blind test-time adaptation as Chen et al.'s code does it, and training accuracy in percent."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import synthetic_dataset

from kshot.config import ConfigError
from kshot.data.sampler import EpisodeSampler
from kshot.episode import Episode
from kshot.learners import LEARNERS, build_learner
from kshot.learners.base import accuracy

IMAGE = (1, 12, 12)
CONV = {"name": "conv4", "hidden": 4, "depth": 2}
BACKBONES = {"relation": {**CONV, "flatten": False}}
WRONG_TYPE = {  # one wrong-typed value for each learner that takes options
    "matching": ("processing_steps", "five"), "r2d2": ("lambda_init", "big"), "relation": ("relation_hidden", 2.5),
    "maml": ("first_order", "sometimes"), "anil": ("inner_lr", "fast"), "metasgd": ("inner_lr_range", "wide"),
    "reptile": ("test_inner_batch_size", True), "siamese": ("margin", "big"), "baseline": ("adapt_batch_size", 2.5),
    "baseline++": ("scale", "large"), "simpleshot": ("mean_momentum", "slow"),
    "versa": ("samples_test", 2.5), "protonet-hallucination": ("hallucinate", "many"),
    "feat": ("temperature", "hot"), "metaoptnet": ("train_iterations", 2.5),
    "tim": ("iterations", 2.5), "bd-cspn": ("pseudo_per_class", "all"), "pt-map": ("lam", "strong"),
    "laplacianshot": ("rectify", "sometimes")}
NOT_DEFAULT = {  # options unlike the defaults, to round-trip
    "matching": {"fce": True, "processing_steps": 2}, "relation": {"relation_channels": 8},
    "maml": {"ways": 3, "test_inner_steps": 4, "task_threads": "auto"}, "anil": {"ways": 3, "first_order": True},
    "metasgd": {"ways": 3, "inner_lr_range": (0.005, 0.1)},
    "reptile": {"ways": 3, "inner_optimizer": "sgd", "test_inner_batch_size": 2, "test_seed": 7},
    "siamese": {"head": "contrastive", "batch_size": 16}, "baseline": {"adapt_batch_size": None},
    "baseline++": {"scale": 5.0}, "simpleshot": {"normalize": "l2n"}}


def build(name: str, options: dict | None = None):
    torch.manual_seed(0)
    return build_learner(name, IMAGE, BACKBONES.get(name, CONV), options)


def episode(ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> Episode:
    return EpisodeSampler(synthetic_dataset(size=IMAGE[-1]), ways, shots, queries, seed=seed).sample()


def scores(learner, task: Episode) -> torch.Tensor:
    with torch.no_grad():
        return learner.adapt(task.support_x, task.support_y)(task.query_x)


# --------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name", LEARNERS)
def test_an_unknown_option_is_a_config_error_naming_it(name):
    with pytest.raises(ConfigError, match=r"^options\.temperatur: unknown setting; .*(known settings|no settings)"):
        build(name, {"temperatur": 2})


@pytest.mark.parametrize("name", LEARNERS)
def test_a_wrong_typed_option_is_a_config_error_naming_it(name):
    if name not in WRONG_TYPE:  # only a learner that takes no options may lack an example
        assert dataclasses.fields(LEARNERS[name].Options) == ()
        return
    key, value = WRONG_TYPE[name]
    with pytest.raises(ConfigError, match=rf"^options\.{key}: input should be .*\(got {value!r}\)$"):
        build(name, {key: value})


def test_out_of_range_and_unknown_messages_are_one_line():
    with pytest.raises(ConfigError) as error:
        build("maml", {"inner_steps": -1})
    assert str(error.value) == "options.inner_steps: input should be greater than or equal to 0 (got -1)"
    with pytest.raises(ConfigError, match=r"^options\.test_inner_lr: leave it unset: Meta-SGD learns .*\(got 0\.1\)$"):
        build("metasgd", {"test_inner_lr": 0.1})
    with pytest.raises(ConfigError, match=r"^options\.batch_size: input should be a multiple of 2 \(got 15\)$"):
        build("siamese", {"batch_size": 15})
    with pytest.raises(ConfigError, match="did you mean 'scale'"):
        build("baseline++", {"scael": 2.0})


@pytest.mark.parametrize("name", LEARNERS)
def test_options_round_trip_through_config_and_json(name):
    learner = build(name, NOT_DEFAULT.get(name))
    if hasattr(learner, "prepare") and "num_classes" in learner.options:
        learner.prepare(synthetic_dataset(size=IMAGE[-1]))  # an option set from the data
    config = json.loads(json.dumps(learner.config()))
    assert set(config["options"]) == {f.name for f in dataclasses.fields(learner.Options)}  # defaults too
    rebuilt = build_learner(config["learner"], config["image_shape"], config["backbone"], config["options"])
    assert type(rebuilt) is type(learner) and rebuilt.config() == learner.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in
                                                                   learner.state_dict().items()}


# --------------------------------------------------------------------------------------------- Reptile
def test_reptile_adapts_deterministically_whatever_the_global_rng():
    learner = build("reptile", {"ways": 3, "test_inner_steps": 6, "test_inner_batch_size": 2, "inner_lr": 0.01})
    learner.eval()
    task = episode()
    logits = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        logits.append(scores(learner, task))
        assert torch.equal(torch.get_rng_state(), state)  # evaluation leaves training's random stream alone
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    learner.options["test_seed"] = 1  # the seed is what fixes the mini-batch order
    assert not torch.equal(scores(learner, task), logits[0])


# -------------------------------------------------------------------------------------------- Baseline
def test_baseline_fits_its_head_as_chen_et_al_by_default(monkeypatch):
    options = LEARNERS["baseline"].Options()
    assert (options.adapt_lr, options.adapt_batch_size, options.adapt_epochs) == (0.01, 4, 100)
    learner = build("baseline")
    learner.eval()
    optimisers, batches = [], []
    sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda params, **kw: optimisers.append(kw) or sgd(params, **kw))
    new_head = learner.new_head

    def spied_head(ways: int) -> torch.nn.Module:
        head = new_head(ways)
        head.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
        return head

    learner.new_head = spied_head
    task = episode(ways=3, shots=2)  # 6 support examples: batches of 4 and 2, 100 times
    learner.adapt(task.support_x, task.support_y)
    assert optimisers == [{"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 1e-3}]
    assert batches == [4, 2] * 100


@pytest.mark.parametrize("name", ["baseline", "baseline++"])
def test_baseline_predictions_ignore_support_order_and_global_rng(name):
    learner = build(name)
    learner.eval()
    assert learner.options["adapt_batch_size"] == 4  # the mini-batches, not full batches, are under test
    task = episode(ways=3, shots=3, queries=2)
    reference = scores(learner, task)
    for seed in range(3):
        torch.manual_seed(100 + seed)
        order = torch.randperm(len(task.support_y), generator=torch.Generator().manual_seed(seed))
        shuffled = Episode(task.support_x[order], task.support_y[order], task.query_x, task.query_y, task.classes)
        torch.testing.assert_close(scores(learner, shuffled), reference, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- accuracy
def test_training_accuracy_is_a_percent():
    assert accuracy(torch.eye(4)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 3])) == 75.0
    protonet = build("protonet")
    task = episode(ways=3, shots=1)
    same = Episode(task.support_x, task.support_y, task.support_x, task.support_y, task.classes)
    _, metrics = protonet.loss(same)  # each query is its own prototype
    assert metrics["accuracy"] == 100.0
    maml = build("maml", {"ways": 3})
    assert maml.metrics(torch.eye(3)[[0, 1, 1, 2]].unsqueeze(0), torch.tensor([[0, 1, 2, 2]])) == {"accuracy": 75.0}
