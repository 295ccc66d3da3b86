"""VERSA (Gordon, Bronskill, Bauer, Nowozin and Turner, ICLR 2019, "Meta-Learning Probabilistic Inference for
Prediction"): amortised Bayesian inference of a linear classifier's weights from each task's support features.

For each class c, the support features of that class are pooled by their mean, and four small networks (the
authors' `inference_block`: two dense hidden layers of the feature width with ELU, then a linear output) map the
pooled vector to the mean and log-variance of a Gaussian over that class's weight vector w_c and bias b_c. The
amortisation is context-independent, class by class, as in the paper, so a task may have any number of ways
and shots. Predictions average the softmax over L samples of the classifier (Monte Carlo):

    p(y | x, support) ~= (1 / L) sum_l softmax(x W_l^T + b_l)_y,   W_l, b_l ~ q(W, b | support).

Training maximises the log of that averaged predictive probability of the query labels (the paper's ML-PIP
objective, computed stably as log-mean-exp over the samples), by reparameterisation. As in the authors' code
(github.com/Gordonjo/versa, src/run_classifier.py), training samples the logits directly with the local
reparameterisation trick: the logits of a query x are Gaussian with mean x.mu_c + mu_b and variance
x^2.sigma_c^2 + sigma_b^2, independent across classes, so L samples of [Q, N] logits cost far less than L
weight matrices. At test the weights themselves are sampled, once per support set from a generator seeded with
`test_seed`: each query's logits then have exactly the same Gaussian distribution (the estimator is unbiased for
the same predictive), but the noise does not depend on which or how many queries are scored together, so a
query always gets the same prediction, whatever the global RNG, the query batch or the support order.

The predictor returns the log of the averaged probabilities as logits, so the softmax of its output is the
Monte Carlo predictive distribution and kshot's evaluation measures its calibration (ECE). `Versa.predictive`
gives the probabilities with their spread over samples and the predictive entropy and its decomposition.

Defaults from the authors' code: L = 10 samples in training (`--samples 10`; their code also scores test tasks
with 10, here `samples_test` 100 by default, for a steadier estimate), hidden width = feature width (their
`d_theta`, 256 for their Omniglot network, 64 for kshot's Conv-4 at 28x28), Xavier-normal weights and
N(0, 1e-3^2) biases in the inference networks (their `dense_layer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass as options_schema
from torch import Tensor, nn

from kshot.config import STRICT
from kshot.episode import Episode
from kshot.learners.base import Learner, Predictor, accuracy, classes_in
from kshot.learners.metric import class_means, embed_episode
from kshot.learners.options import PositiveCount, feature_dim


def inference_block(features: int, hidden: int, outputs: int) -> nn.Sequential:
    """The authors' `inference_block`: dense(hidden, ELU), dense(hidden, ELU), dense(outputs), each initialised
    as their `dense_layer` (Xavier-normal weights, biases drawn from N(0, 1e-3^2))."""
    block = nn.Sequential(nn.Linear(features, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                          nn.Linear(hidden, outputs))
    for layer in block:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-3)
    return block


@dataclass(frozen=True)
class ClassifierPosterior:
    """q(W, b | support): independent Gaussians over each class's weights [..., N, D] and bias [..., N]."""

    weight_mean: Tensor
    weight_log_variance: Tensor
    bias_mean: Tensor
    bias_log_variance: Tensor

    def logit_moments(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance [..., Q, N] of the logits of query features [..., Q, D] under q (the logits of one
        query are independent Gaussians across classes: the local reparameterisation trick)."""
        mean = query @ self.weight_mean.transpose(-1, -2) + self.bias_mean.unsqueeze(-2)
        variance = query.pow(2) @ self.weight_log_variance.exp().transpose(-1, -2) \
            + self.bias_log_variance.exp().unsqueeze(-2)
        return mean, variance

    def mean_logits(self, query: Tensor) -> Tensor:
        """Logits [..., Q, N] of the classifier at the posterior mean (no sampling)."""
        return query @ self.weight_mean.transpose(-1, -2) + self.bias_mean.unsqueeze(-2)

    def sample_logits(self, query: Tensor, samples: int) -> Tensor:
        """[L, ..., Q, N] logit samples by local reparameterisation, noise from the global RNG (training)."""
        mean, variance = self.logit_moments(query)
        noise = torch.randn((samples, *mean.shape), dtype=mean.dtype, device=mean.device)
        return mean + noise * variance.sqrt()

    def sample_classifiers(self, samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """L classifiers drawn from q: weights [L, ..., N, D] and biases [L, ..., N] by reparameterisation, the
        noise drawn on the CPU from `generator` (the same noise on any device) and moved to the posterior's."""
        mean = self.weight_mean
        weight_noise = torch.randn((samples, *mean.shape), generator=generator).to(mean.device, mean.dtype)
        bias_noise = torch.randn((samples, *self.bias_mean.shape), generator=generator).to(mean.device, mean.dtype)
        weights = mean + weight_noise * (0.5 * self.weight_log_variance).exp()
        biases = self.bias_mean + bias_noise * (0.5 * self.bias_log_variance).exp()
        return weights, biases


def log_predictive(logit_samples: Tensor) -> Tensor:
    """log of the Monte Carlo predictive probabilities, log (1/L) sum_l softmax(logits_l): [L, ..., N] -> [..., N],
    computed as a log-mean-exp of log-softmaxes (no underflow for confident samples)."""
    return torch.logsumexp(F.log_softmax(logit_samples, dim=-1), dim=0) - math.log(logit_samples.shape[0])


def predictive_loss(logit_samples: Tensor, labels: Tensor) -> Tensor:
    """VERSA's training loss: minus the mean over queries of log (1/L) sum_l p(y | x, W_l), the log of the
    Monte Carlo predictive probability of the true label; logit samples [L, ..., Q, N], labels [..., Q]."""
    log_p = F.log_softmax(logit_samples, dim=-1)
    index = labels.unsqueeze(0).expand(logit_samples.shape[:-1]).unsqueeze(-1)
    per_sample = log_p.gather(-1, index).squeeze(-1)  # [L, ..., Q]
    return -(torch.logsumexp(per_sample, dim=0) - math.log(logit_samples.shape[0])).mean()


def entropy(probabilities: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dimension (0 log 0 = 0)."""
    return -torch.special.xlogy(probabilities, probabilities).sum(-1)


@dataclass(frozen=True)
class Predictive:
    """VERSA's predictive distribution for a set of queries, with how uncertain it is.

    probabilities [Q, N]: the Monte Carlo average of the sampled classifiers' softmax; std [Q, N]: the spread
    (standard deviation) of those per-sample probabilities; entropy [Q]: the predictive entropy (nats) of the
    averaged probabilities, the total uncertainty; expected_entropy [Q]: the mean entropy of the individual
    samples' predictions. Their difference, `mutual_information`, is the part due to uncertainty about the
    classifier's weights (the samples disagree), zero when the posterior has no variance."""

    probabilities: Tensor
    std: Tensor
    entropy: Tensor
    expected_entropy: Tensor

    @property
    def mutual_information(self) -> Tensor:
        return self.entropy - self.expected_entropy


class Versa(Learner):
    """VERSA: a Gaussian posterior over a linear classifier, amortised class by class (options: `Versa.Options`)."""

    name = "versa"
    works_on_features = True

    @options_schema(config=STRICT)
    class Options:
        """samples_train: Monte Carlo samples L of the logits in training (the authors' 10); samples_test:
        classifier samples at test; hidden: width of the inference networks' two hidden layers, None for the
        feature width (the authors' d_theta); test_seed: seeds the test-time samples afresh on every `adapt`,
        so the same support set always gives the same predictor (the global RNG is never touched at test)."""

        samples_train: PositiveCount = 10
        samples_test: PositiveCount = 100
        hidden: PositiveCount | None = None
        test_seed: int = 0

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        width = feature_dim(backbone, self.image_shape)
        hidden = self.options["hidden"] or width
        self.weight_mean = inference_block(width, hidden, width)
        self.weight_log_variance = inference_block(width, hidden, width)
        self.bias_mean = inference_block(width, hidden, 1)
        self.bias_log_variance = inference_block(width, hidden, 1)

    def posterior(self, support: Tensor, support_y: Tensor, ways: int) -> ClassifierPosterior:
        """q(W, b | support) from support features [..., M, D] labelled [..., M] in 0..ways-1: each class's mean
        feature goes through the four inference networks (the same networks for every class)."""
        pooled = class_means(support, support_y, ways)  # [..., N, D]
        return ClassifierPosterior(self.weight_mean(pooled), self.weight_log_variance(pooled),
                                   self.bias_mean(pooled).squeeze(-1), self.bias_log_variance(pooled).squeeze(-1))

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        support, query = embed_episode(self.backbone, batch)
        lead = batch.support_y.dim()  # flatten feature maps, keeping [..., M]
        posterior = self.posterior(support.flatten(lead), batch.support_y, batch.ways)
        samples = posterior.sample_logits(query.flatten(lead), self.options["samples_train"])
        loss = predictive_loss(samples, batch.query_y)
        averaged = log_predictive(samples.detach()).reshape(-1, batch.ways)
        return loss, {"accuracy": accuracy(averaged, batch.query_y.reshape(-1))}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def sampled_classifiers(self, support: Tensor, support_y: Tensor, samples: int | None = None,
                            seed: int | None = None) -> tuple[Tensor, Tensor]:
        """The test-time classifiers of a support set: weights [L, N, D] and biases [L, N] drawn from q with a
        generator seeded afresh (`test_seed` unless `seed` is given), L = `samples_test` unless given."""
        posterior = self.posterior(support.flatten(1), support_y, classes_in(support_y))
        generator = torch.Generator().manual_seed(self.options["test_seed"] if seed is None else seed)
        return posterior.sample_classifiers(samples or self.options["samples_test"], generator)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        weights, biases = self.sampled_classifiers(support, support_y)

        def predict(query: Tensor) -> Tensor:
            logits = query.flatten(1) @ weights.transpose(-1, -2) + biases.unsqueeze(-2)  # [L, Q, N]
            return log_predictive(logits)

        return predict

    def predictive(self, support: Tensor, support_y: Tensor, query: Tensor, samples: int | None = None,
                   seed: int | None = None) -> Predictive:
        """The predictive distribution of query features [Q, ...] given support features [M, ...] (from `embed`)
        and labels, with its per-sample spread and entropies; the same samples as `adapt_embedded` uses."""
        weights, biases = self.sampled_classifiers(support, support_y, samples, seed)
        per_sample = (query.flatten(1) @ weights.transpose(-1, -2) + biases.unsqueeze(-2)).softmax(-1)
        probabilities = per_sample.mean(0)
        spread = per_sample.std(0, correction=1) if len(per_sample) > 1 else torch.zeros_like(probabilities)
        return Predictive(probabilities, spread, entropy(probabilities), entropy(per_sample).mean(0))
