"""ProtoNet with feature hallucination (kshot/learners/hallucination.py): exactly ProtoNet without hallucinated
examples, prototypes over real and generated features, deterministic test-time noise, G trained by the query
loss, seeds taken from each class in a balanced, order-blind way."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import synthetic_dataset

from kshot.data.sampler import EpisodeSampler
from kshot.episode import Episode
from kshot.learners import build_learner
from kshot.learners.hallucination import ProtoNetHallucination, seed_indices
from kshot.learners.metric import class_means, squared_euclidean

IMAGE = (1, 12, 12)
CONV = {"name": "conv4", "hidden": 8, "depth": 3}  # 8 features at 12x12
DATASET = synthetic_dataset(classes=8, per_class=9, size=12, seed=0)


def episode(ways: int = 4, shots: int = 1, queries: int = 3, seed: int = 0, batch: int = 1) -> Episode:
    sampler = EpisodeSampler(DATASET, ways, shots, queries, seed=seed)
    return sampler.sample() if batch == 1 else sampler.sample_batch(batch)


def learner(**options) -> ProtoNetHallucination:
    torch.manual_seed(0)
    built = build_learner("protonet-hallucination", IMAGE, CONV, options)
    built.eval()
    return built


def test_without_hallucinated_examples_it_is_exactly_protonet():
    hallucinating = learner(hallucinate=0)
    protonet = build_learner("protonet", IMAGE, copy.deepcopy(hallucinating.backbone))
    protonet.eval()
    task = episode(shots=2)
    with torch.no_grad():
        assert torch.equal(hallucinating.adapt(task.support_x, task.support_y)(task.query_x),
                           protonet.adapt(task.support_x, task.support_y)(task.query_x))
    hallucinating.train()
    protonet.train()
    batch = episode(shots=2, batch=2)
    (ours, _), (theirs, _) = hallucinating.loss(batch), protonet.loss(batch)
    assert torch.equal(ours, theirs)
    ours.backward()
    assert all(p.grad is None for p in hallucinating.hallucinator.parameters())  # G is not used at all


def test_prototypes_average_real_and_hallucinated_features():
    model = learner(hallucinate=3)
    task = episode(ways=4, shots=2)
    with torch.no_grad():
        support = model.embed(task.support_x)
        noise = model.test_noise(4, support.device, support.dtype)
        fake = model.hallucinate(support, task.support_y, 4, noise)  # [ways, 3, D]
        # Independent reference: pool the real and the generated examples as one labelled set.
        pooled = torch.cat([support, fake.flatten(0, 1)])
        labels = torch.cat([task.support_y, torch.arange(4).repeat_interleave(3)])
        reference = class_means(pooled, labels, 4)
        torch.testing.assert_close(model.prototypes(support, task.support_y, 4, noise), reference)
        logits = model.adapt(task.support_x, task.support_y)(task.query_x)
        torch.testing.assert_close(logits, -squared_euclidean(model.embed(task.query_x), reference))


@pytest.mark.parametrize("shots", [1, 5])
def test_shapes_for_one_and_five_shots(shots):
    ways, queries, extra = 4, 2, 3
    model = learner(hallucinate=extra, noise_dim=5, hidden=16)
    task = episode(ways=ways, shots=shots, queries=queries)
    with torch.no_grad():
        support = model.embed(task.support_x)
        noise = model.test_noise(ways, support.device, support.dtype)
        assert noise.shape == (ways, extra, 5)
        assert model.hallucinate(support, task.support_y, ways, noise).shape == (ways, extra, support.shape[1])
        assert model.prototypes(support, task.support_y, ways, noise).shape == (ways, support.shape[1])
        assert model.adapt(task.support_x, task.support_y)(task.query_x).shape == (ways * queries, ways)
    model.train()
    loss, metrics = model.loss(episode(ways=ways, shots=shots, queries=queries, batch=3))
    assert loss.dim() == 0 and torch.isfinite(loss) and 0 <= metrics["accuracy"] <= 100


def test_test_time_hallucinations_are_fixed_by_the_seed():
    model = learner(hallucinate=4)
    task = episode(shots=2)
    with torch.no_grad():
        support = model.embed(task.support_x)

        def generated(seed: int | None = None) -> torch.Tensor:
            return model.hallucinate(support, task.support_y, 4, model.test_noise(4, support.device, support.dtype,
                                                                                     seed))

        torch.manual_seed(1)
        first = generated()
        torch.manual_seed(2)
        state = torch.get_rng_state()
        assert torch.equal(generated(), first) and torch.equal(generated(seed=0), first)  # test_seed 0
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used at test
        other = generated(seed=1)
        assert not torch.allclose(other, first, atol=1e-4)
        model.options["test_seed"] = 1
        assert torch.equal(generated(), other)
        outputs = [model.adapt(task.support_x, task.support_y)(task.query_x) for _ in range(2)]
    assert torch.equal(outputs[0], outputs[1])


def test_the_query_loss_trains_the_hallucinator():
    model = learner(hallucinate=2)
    model.train()
    loss, _ = model.loss(episode(shots=1, batch=2))
    loss.backward()
    grads = [p.grad for p in model.hallucinator.parameters()]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    # The noise differs from step to step in training (global RNG), so two losses on one batch differ.
    batch = episode(shots=1, batch=2)
    with torch.no_grad():
        assert model.loss(batch)[0] != model.loss(batch)[0]


def test_seeds_are_balanced_within_each_class_and_ignore_the_support_order():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 0, 1])  # 2, 4 and 2 examples: unequal shots are allowed
    support = torch.randn(len(labels), 5, generator=generator)
    seeds = seed_indices(support, labels, 3, per_class=6)
    assert seeds.shape == (3, 6)
    assert bool((labels[seeds] == torch.arange(3).unsqueeze(1)).all())  # every seed is of its own class
    for c in range(3):
        uses = torch.bincount(seeds[c], minlength=len(labels))[labels == c]
        assert uses.max() - uses.min() <= 1  # each example of the class seeds as many as the others (+- 1)
    order = torch.randperm(len(labels), generator=generator)
    shuffled = seed_indices(support[order], labels[order], 3, per_class=6)
    assert torch.equal(support[order][shuffled], support[seeds])  # the same features seed the same examples
