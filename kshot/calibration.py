"""Calibration: expected calibration error (ECE) of a classifier's confidence, so that uncertainty claims are measured.

ECE (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the predictions are put in `bins` equal-width
bins of confidence ((0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]), where confidence is the largest softmax probability,
and ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|. Because |B_b| * acc(B_b) is the number of correct predictions
in the bin and |B_b| * conf(B_b) the sum of their confidences, ECE = sum_b |correct_b - confidence_sum_b| / n: three
numbers a bin are all it needs, and they add up over episodes (and processes).

Over an evaluation set, `ece` pools every query of every episode (sum the episodes' bin counts, then one ECE):
that is Guo et al.'s definition over a test set, and it does not depend on how queries are split into episodes.
The mean of per-episode ECEs is also given, but it is biased upward: with 75 queries spread over 15 bins, each
bin's accuracy is noisy and |acc - conf| counts the noise as miscalibration.
"""

from __future__ import annotations

import torch
from torch import Tensor

BINS = 15
COUNT, CONFIDENCE, CORRECT = 0, 1, 2  # the three columns of a bin-counts tensor


def is_class_logits(output: Tensor, targets: Tensor) -> bool:
    """True when `output` is [Q, N] class scores for Q integer class labels: the only case ECE applies to
    (regression outputs, such as a sinusoid's [Q, 1] values with float targets, have no confidence)."""
    return (output.dim() == 2 and targets.dim() == 1 and len(output) == len(targets) and output.shape[1] >= 2
            and not targets.is_floating_point() and not targets.is_complex())


def bin_counts(scores: Tensor, targets: Tensor, bins: int = BINS, probabilities: bool = False) -> Tensor:
    """Per-bin [count, sum of confidences, number correct] of [Q, N] logits (or, with probabilities=True,
    probabilities) against Q class labels, as a float64 [bins, 3] tensor on the scores' device (no sync)."""
    if not is_class_logits(scores, targets):
        raise ValueError(f"calibration needs [queries, classes] scores and integer class labels, got scores of "
                         f"shape {tuple(scores.shape)} and targets of shape {tuple(targets.shape)} ({targets.dtype})")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    scores = scores.detach().double()
    confidence, predicted = (scores if probabilities else scores.softmax(-1)).max(-1)
    correct = (predicted == targets.to(predicted.device)).double()
    index = (confidence * bins).ceil().long().clamp_(1, bins) - 1  # bin b holds confidences in (b/B, (b+1)/B]
    counts = torch.zeros(bins, 3, dtype=torch.float64, device=scores.device)
    return counts.index_add_(0, index, torch.stack([torch.ones_like(confidence), confidence, correct], -1))


def ece_from_counts(counts: Tensor) -> Tensor:
    """ECE (a fraction in [0, 1]) of [..., bins, 3] bin counts: one value per leading index (e.g. per episode)."""
    gaps = (counts[..., CORRECT] - counts[..., CONFIDENCE]).abs().sum(-1)
    return gaps / counts[..., COUNT].sum(-1)


def expected_calibration_error(scores: Tensor, targets: Tensor, bins: int = BINS,
                               probabilities: bool = False) -> float:
    """ECE (a fraction in [0, 1]) of [Q, N] logits (or probabilities, with probabilities=True) against Q labels."""
    return ece_from_counts(bin_counts(scores, targets, bins, probabilities)).item()


def gather_counts(counts: Tensor, rank: int, world_size: int, total: int) -> Tensor:
    """Per-episode [E, bins, 3] counts of an episode set split round-robin between processes (process r scored
    episodes r, r + world size, ...), back in episode order on every process, like `distributed.gather_scores`:
    summing them afterwards gives every process the numbers one process would compute."""
    import torch.distributed as dist

    full = torch.zeros(total, *counts.shape[1:], dtype=torch.float64, device=counts.device)
    full[rank::world_size] = counts
    dist.all_reduce(full)
    return full
