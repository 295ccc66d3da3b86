"""VERSA (kshot/learners/versa.py): the log-mean-exp predictive loss, the Monte Carlo predictive and its
uncertainty, deterministic and order-blind test-time predictions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kshot.episode import Episode
from kshot.learners import build_learner
from kshot.learners.versa import ClassifierPosterior, Versa, log_predictive, predictive_loss

D, WAYS = 6, 4


def versa(**options) -> Versa:
    """VERSA on D-long feature vectors given as [M, 1, 1, D] "images" (the backbone only flattens them)."""
    torch.manual_seed(0)
    return build_learner("versa", (1, 1, D), nn.Flatten(), options)


def clusters(generator: torch.Generator, shots: int, queries: int, tasks: int | None = None,
             spread: float = 0.3) -> Episode:
    """A task (or a meta-batch of them) of WAYS Gaussian clusters with random centres, as feature vectors."""
    lead = () if tasks is None else (tasks,)
    centres = 2 * torch.randn(*lead, WAYS, D, generator=generator)
    support = centres.repeat_interleave(shots, -2) + spread * torch.randn(*lead, WAYS * shots, D, generator=generator)
    query = centres.repeat_interleave(queries, -2) + spread * torch.randn(*lead, WAYS * queries, D,
                                                                            generator=generator)
    labels = torch.arange(WAYS)
    return Episode(support[..., None, None, :], labels.repeat_interleave(shots).expand(*lead, -1),
                   query[..., None, None, :], labels.repeat_interleave(queries).expand(*lead, -1),
                   labels.expand(*lead, -1))


def features(task: Episode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return task.support_x.flatten(-3), task.support_y, task.query_x.flatten(-3)


def without_variance(learner: Versa) -> Versa:
    """The same learner with both log-variance networks giving exp(-200) = 0 (in float32): no sampling noise."""
    with torch.no_grad():
        for block in (learner.weight_log_variance, learner.bias_log_variance):
            block[-1].weight.zero_()
            block[-1].bias.fill_(-200.0)
    return learner


def test_loss_is_minus_the_log_of_the_averaged_predictive_probability():
    generator = torch.Generator().manual_seed(0)
    samples = 3 * torch.randn(7, 2, 5, WAYS, generator=generator, dtype=torch.float64)  # [L, tasks, Q, N]
    labels = torch.randint(0, WAYS, (2, 5), generator=generator)
    probabilities = samples.softmax(-1)  # direct: average the probabilities of the true labels, then the log
    true = torch.stack([probabilities[..., q, labels[t, q]][:, t] for t in range(2) for q in range(5)], -1)
    direct = -true.mean(0).log().mean()
    torch.testing.assert_close(predictive_loss(samples, labels), direct)
    torch.testing.assert_close(log_predictive(samples).exp(), probabilities.mean(0))
    # Confidently wrong samples: the direct average underflows to log(0) in float32, the log-mean-exp does not.
    wrong = torch.tensor([[[-200.0, 0.0]], [[-201.0, 0.0]]])  # two samples, one query of class 0, two classes
    assert math.isinf(wrong.softmax(-1)[:, 0, 0].mean().log().item())
    expected = 200 - math.log((1 + math.exp(-1)) / 2)
    torch.testing.assert_close(predictive_loss(wrong, torch.tensor([0])), torch.tensor(expected))


def test_without_variance_the_monte_carlo_average_is_the_mean_classifier():
    learner = without_variance(versa(samples_test=7, samples_train=3))
    task = clusters(torch.Generator().manual_seed(1), shots=2, queries=3)
    support, labels, query = features(task)
    mean_logits = learner.posterior(support, labels, WAYS).mean_logits(query)
    with torch.no_grad():
        torch.testing.assert_close(learner.adapt_embedded(support, labels)(query), F.log_softmax(mean_logits, -1))
    loss, _ = learner.loss(task)
    torch.testing.assert_close(loss, F.cross_entropy(mean_logits, task.query_y))


def test_both_samplers_draw_the_logit_distribution_of_the_posterior():
    # Training samples logits (local reparameterisation), test samples weights: the same Gaussian per query.
    generator = torch.Generator().manual_seed(2)
    posterior = ClassifierPosterior(torch.randn(WAYS, D, generator=generator),
                                    torch.randn(WAYS, D, generator=generator) - 1,
                                    torch.randn(WAYS, generator=generator), torch.randn(WAYS, generator=generator) - 1)
    query = torch.randn(3, D, generator=generator)
    mean, variance = posterior.logit_moments(query)
    torch.manual_seed(0)
    local = posterior.sample_logits(query, 20000)
    weights, biases = posterior.sample_classifiers(20000, torch.Generator().manual_seed(0))
    sampled = query @ weights.transpose(-1, -2) + biases.unsqueeze(-2)
    for draws in (local, sampled):
        torch.testing.assert_close(draws.mean(0), mean, atol=0.05 * variance.sqrt().max().item(), rtol=0)
        torch.testing.assert_close(draws.var(0), variance, rtol=0.06, atol=0)


def test_more_samples_give_a_steadier_estimate_of_the_predictive():
    learner = versa()
    support, labels, query = features(clusters(torch.Generator().manual_seed(3), shots=1, queries=2))
    with torch.no_grad():
        def spread(samples: int) -> float:
            estimates = torch.stack([learner.predictive(support, labels, query, samples=samples, seed=s).probabilities
                                     for s in range(24)])
            return estimates.var(0).mean().item()

        few, many = spread(4), spread(64)
    assert few > 0 and many < few / 5  # the variance of a Monte Carlo mean falls as 1/L (16 times here)


def test_test_predictions_are_deterministic_and_leave_the_global_rng_alone():
    learner = versa()
    learner.eval()
    task = clusters(torch.Generator().manual_seed(4), shots=2, queries=3)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        with torch.no_grad():
            outputs.append(learner.adapt(task.support_x, task.support_y)(task.query_x))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0].exp().sum(-1), torch.ones(len(task.query_y)))  # log-probabilities
    learner.options["test_seed"] = 1  # the seed is what fixes the samples
    with torch.no_grad():
        assert not torch.equal(learner.adapt(task.support_x, task.support_y)(task.query_x), outputs[0])


def test_predictions_do_not_depend_on_the_order_within_a_class():
    learner = versa()
    task = clusters(torch.Generator().manual_seed(5), shots=5, queries=2)
    support, labels, query = features(task)
    with torch.no_grad():
        reference = learner.adapt_embedded(support, labels)(query)
        for seed in range(3):
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(learner.adapt_embedded(support[order], labels[order])(query), reference,
                                       atol=1e-5, rtol=0)
        # A different support set of the same classes does change the predictions (the test can fail).
        assert not torch.allclose(learner.adapt_embedded(support.roll(1, 0), labels)(query), reference, atol=1e-3)


def test_after_meta_training_the_uncertainty_about_the_weights_is_higher_far_from_every_class():
    learner = versa(samples_test=200)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100)
    for _ in range(150):  # meta-train on cluster tasks, 8 a step
        loss, _ = learner.loss(clusters(generator, shots=1, queries=5, tasks=8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    near, far, far_entropy, mean_classifier_far, correct = [], [], [], [], []
    with torch.no_grad():
        for task in clusters(generator, shots=1, queries=5, tasks=20).unbind():
            support, labels, query = features(task)
            away = torch.randn(20, D, generator=generator)
            away = 30 * away / away.norm(dim=1, keepdim=True)  # class centres have norms of about 5
            here, there = learner.predictive(support, labels, query), learner.predictive(support, labels, away)
            mean = learner.posterior(support, labels, WAYS).mean_logits(away).softmax(-1)
            near.append(here.mutual_information.mean())
            far.append(there.mutual_information.mean())
            far_entropy.append(there.entropy.mean())
            mean_classifier_far.append(-torch.special.xlogy(mean, mean).sum(-1).mean())
            correct.append((here.probabilities.argmax(-1) == task.query_y).float().mean())
    near, far, far_entropy, mean_far = (torch.stack(v).mean().item()
                                        for v in (near, far, far_entropy, mean_classifier_far))
    assert torch.stack(correct).mean() > 0.85  # it did learn the tasks
    # The sampled classifiers agree on queries of the task's classes and disagree far from all of them: the
    # part of the predictive entropy due to the weights' uncertainty (mutual information) is higher there.
    assert far > 3 * near
    # Far from the data a linear classifier's logits grow with the distance, so the mean classifier is
    # (over)confident there; the posterior's logit spread grows as fast, so VERSA's predictive stays uncertain.
    assert far_entropy > 2 * mean_far
