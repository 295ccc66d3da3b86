"""FEAT (Ye et al. 2020) against its formulas: the set function equals a by-hand transformer layer and is
permutation-equivariant, a zeroed attention output leaves only layer norm (logits then equal ProtoNet's on the
normalised prototypes, over the temperature), the contrastive regulariser equals a per-class by-hand computation,
any N-way K-shot task gets logits of the right shape, a meta-batch's loss is the mean of its tasks', global
pooling, and a short run lowers the loss."""

from __future__ import annotations

import math
from itertools import islice

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_dataset
from torch import nn

from kshot.config import ConfigError
from kshot.episode import Episode
from kshot.learners import build_learner
from kshot.learners.base import EpisodeShape
from kshot.learners.feat import FEAT, SetAttention

DIM = 6


def episode(generator: torch.Generator, ways: int = 3, shots: int = 2, queries: int = 2) -> Episode:
    sy, qy = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)
    return Episode(torch.randn(len(sy), 1, 1, DIM, generator=generator), sy,
                   torch.randn(len(qy), 1, 1, DIM, generator=generator), qy, torch.arange(ways))


def learner(**options) -> FEAT:
    torch.manual_seed(0)
    built = FEAT(nn.Flatten(), (1, 1, DIM), **options)
    return built.eval()  # no dropout


def by_hand(attention: SetAttention, x: torch.Tensor) -> torch.Tensor:
    """One-head self-attention, residual and layer norm written out (the authors' MultiHeadAttention)."""
    q, k, v = x @ attention.query.weight.T, x @ attention.key.weight.T, x @ attention.value.weight.T
    weights = torch.exp(q @ k.T / math.sqrt(x.shape[-1]))
    weights = weights / weights.sum(-1, keepdim=True)
    y = x + (weights @ v) @ attention.out.weight.T + attention.out.bias
    normalised = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return normalised * attention.norm.weight + attention.norm.bias


def test_set_function_is_the_transformer_layer_and_permutation_equivariant():
    torch.manual_seed(0)
    attention = SetAttention(DIM).eval()
    with torch.no_grad():
        attention.norm.weight.uniform_(0.5, 1.5)
        attention.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, DIM)
    torch.testing.assert_close(attention(x), by_hand(attention, x))
    order = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(attention(x[order]), attention(x)[order])
    # Batched sets [..., S, D] are adapted independently; any set size works.
    sets = torch.randn(2, 3, 4, DIM)
    torch.testing.assert_close(attention(sets)[1, 2], attention(sets[1, 2]))
    assert attention(torch.randn(1, DIM)).shape == (1, DIM)
    # The authors' initialisation: N(0, 1/d) for the projections, temperature sqrt(d).
    assert attention.temperature == math.sqrt(DIM) and attention.query.bias is None


def test_zeroed_attention_output_leaves_layer_normed_prototypes_and_protonet_logits():
    feat = learner(temperature=4.0)
    with torch.no_grad():
        feat.set_function.out.weight.zero_()
        feat.set_function.out.bias.zero_()
    task = episode(torch.Generator().manual_seed(2))
    support, query = task.support_x.flatten(1), task.query_x.flatten(1)
    prototypes = torch.stack([support[task.support_y == c].mean(0) for c in range(3)])
    normalised = F.layer_norm(prototypes, (DIM,))  # the layer norm's initial affine map is the identity
    expected = -((query[:, None, :] - normalised[None]) ** 2).sum(-1) / 4.0  # ProtoNet's logits / temperature
    torch.testing.assert_close(feat.adapt(task.support_x, task.support_y)(task.query_x), expected)


def test_relabelling_the_classes_permutes_the_logit_columns():
    feat = learner()
    task = episode(torch.Generator().manual_seed(3), ways=4)
    logits = feat.adapt(task.support_x, task.support_y)(task.query_x)
    relabel = torch.tensor([2, 0, 3, 1])  # class c becomes relabel[c]
    permuted = feat.adapt(task.support_x, relabel[task.support_y])(task.query_x)
    torch.testing.assert_close(permuted[:, relabel], logits)


def test_cosine_variant_divides_the_dot_product_with_normalised_prototypes():
    feat = learner(use_euclidean=False, temperature=2.0)
    task = episode(torch.Generator().manual_seed(4))
    support = task.support_x.flatten(1)
    prototypes = feat.set_function(torch.stack([support[task.support_y == c].mean(0) for c in range(3)]))
    expected = task.query_x.flatten(1) @ (prototypes / prototypes.norm(dim=-1, keepdim=True)).T / 2.0
    torch.testing.assert_close(feat.adapt(task.support_x, task.support_y)(task.query_x), expected)


def test_loss_is_cross_entropy_plus_balance_times_the_contrastive_term_by_hand():
    feat = learner(temperature=8.0, temperature2=2.0, balance=0.5)
    task = episode(torch.Generator().manual_seed(5), ways=3, shots=2, queries=3)
    support, query = task.support_x.flatten(1), task.query_x.flatten(1)
    logits = feat.adapt(task.support_x, task.support_y)(task.query_x)
    main = F.cross_entropy(logits, task.query_y)
    # Each class's support and query embeddings form one set; its adapted centre classifies every embedding.
    everything, labels = torch.cat([support, query]), torch.cat([task.support_y, task.query_y])
    centres = torch.stack([feat.set_function(everything[labels == c]).mean(0) for c in range(3)])
    regulariser = F.cross_entropy(-torch.cdist(everything, centres) ** 2 / 2.0, labels)
    loss, metrics = feat.loss(task)
    torch.testing.assert_close(loss, main + 0.5 * regulariser)
    assert metrics["accuracy"] == 100 * (logits.argmax(-1) == task.query_y).float().mean().item()
    torch.testing.assert_close(learner(temperature=8.0, balance=0.0).loss(task)[0], main)


def test_contrastive_term_needs_balanced_classes():
    feat = learner()
    task = episode(torch.Generator().manual_seed(6))
    unbalanced = Episode(task.support_x, task.support_y, task.query_x[:5], task.query_y[:5], task.classes)
    with pytest.raises(ValueError, match="same number of examples of every class"):
        feat.loss(unbalanced)


@pytest.mark.parametrize(("ways", "shots"), [(5, 1), (5, 5), (3, 2)])
def test_any_ways_and_shots_give_logits_of_shape_queries_by_ways(ways, shots):
    feat = learner()
    task = episode(torch.Generator().manual_seed(7), ways=ways, shots=shots, queries=3)
    logits = feat.adapt(task.support_x, task.support_y)(task.query_x)
    assert logits.shape == (3 * ways, ways) and bool(torch.isfinite(logits).all())
    feat.train()
    loss, _ = feat.loss(task)
    loss.backward()
    assert math.isfinite(loss.item()) and feat.set_function.query.weight.grad is not None


def test_meta_batch_loss_is_the_mean_of_the_task_losses():
    feat = learner(balance=0.3)
    generator = torch.Generator().manual_seed(8)
    tasks = [episode(generator) for _ in range(3)]
    meta, _ = feat.loss(Episode.stack(tasks))
    torch.testing.assert_close(meta, torch.stack([feat.loss(t)[0] for t in tasks]).mean())


def test_global_pooling_of_feature_maps_and_its_error():
    torch.manual_seed(0)
    pooled = FEAT(nn.Identity(), (2, 3, 3), pool="max")
    images = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(pooled.embed(images), images.amax(dim=(-2, -1)))
    assert pooled.set_function.norm.normalized_shape == (2,)
    averaged = FEAT(nn.Identity(), (2, 3, 3), pool="avg")
    torch.testing.assert_close(averaged.embed(images), images.mean(dim=(-2, -1)))
    assert FEAT(nn.Identity(), (2, 3, 3)).set_function.norm.normalized_shape == (18,)  # flattened
    with pytest.raises(ConfigError, match=r"^options\.pool: max pooling needs a backbone that gives feature maps"):
        FEAT(nn.Flatten(), (2, 3, 3), pool="max")


def test_short_training_run_lowers_the_loss():
    dataset = synthetic_dataset(classes=12, per_class=8, size=12, seed=0)
    torch.manual_seed(0)
    feat = build_learner("feat", (1, 12, 12), {"name": "conv4", "hidden": 8, "depth": 3},
                         {"temperature": 1.0, "temperature2": 1.0, "balance": 0.1})
    batches = list(islice(feat.training_stream(dataset, EpisodeShape(5, 1, 3), seed=0), 6))
    optimizer = torch.optim.Adam(feat.parameters(), lr=0.01)

    def mean_loss() -> float:
        feat.eval()
        with torch.no_grad():
            return sum(feat.loss(b)[0].item() for b in batches) / len(batches)

    before = mean_loss()
    for _ in range(4):
        feat.train()
        for b in batches:
            loss, _ = feat.loss(b)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert mean_loss() < 0.8 * before
