"""Evaluation as papers report it: mean accuracy and 95% confidence interval over a fixed episode set, with the
expected calibration error of classifiers' confidence (`kshot.calibration`) on the same episodes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from kshot import distributed
from kshot.batchnorm import batchnorm_mode
from kshot.calibration import BINS, bin_counts, ece_from_counts, gather_counts, is_class_logits
from kshot.data.sampler import EpisodeSet
from kshot.learners.base import Learner
from kshot.progress import progress_bar

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def mean_ci95(values: Tensor | list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval of the mean: 1.96 * sample std / sqrt(n)."""
    data = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(data) == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if len(data) == 1:
        return data.item(), float("nan")
    return data.mean().item(), Z_95 * data.std(unbiased=True).item() / math.sqrt(len(data))


def query_accuracy(output: Tensor, target: Tensor) -> float:
    return (output.argmax(-1) == target).double().mean().item()


@dataclass
class EvaluationResult:
    """Mean score (percent for accuracy) and its 95% CI over `episodes` episodes, with how it was obtained.

    `ece` is the expected calibration error in percent (15 bins) over all queries of all episodes pooled;
    `episode_ece` and `episode_ece_ci95` are the mean of per-episode ECEs and its 95% CI (biased upward by the
    few queries an episode has; see `kshot.calibration`). All three are None when the learner's outputs are not
    class scores (regression).
    """

    accuracy: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int
    bn_mode: str
    seconds: float
    dataset: str
    seed: int
    per_episode: list[float] = field(repr=False, default_factory=list)
    ece: float | None = None
    episode_ece: float | None = None
    episode_ece_ci95: float | None = None
    transductive: bool = False
    """True when the learner predicted each episode's queries together (`Learner.transductive`)."""

    def summary(self) -> str:
        """One line: mean +- 95% CI, or a plain statement that one episode gives no interval (not "+- nan")."""
        interval = f"+- {self.ci95:.2f}% (95% CI, {self.episodes} episodes, " if math.isfinite(self.ci95) else \
            f"(no confidence interval from {self.episodes} episode, "
        calibration = "" if self.ece is None else f"; ECE {self.ece:.2f}% ({BINS} bins, all queries pooled)"
        inference = ", transductive: queries predicted together" if self.transductive else ""
        return (f"{self.ways}-way {self.shots}-shot on {self.dataset}: {self.accuracy:.2f}% {interval}"
                f"{self.queries} queries/class, batch norm: {self.bn_mode}{inference}){calibration}")

    def as_row(self) -> dict[str, Any]:
        """The result as a JSON-safe row (a CI is None when there is no interval, as JSON has no NaN)."""
        row = asdict(self)
        row.pop("per_episode")
        for key in ("ci95", "episode_ece_ci95"):
            if row[key] is not None and not math.isfinite(row[key]):
                row[key] = None
        return row


def evaluate(learner: Learner, episodes: EpisodeSet, bn_mode: str = "inference",
             device: torch.device | str | None = None, progress: bool = True,
             metric: Callable[[Tensor, Tensor], float] = query_accuracy,
             across_processes: bool = False) -> EvaluationResult:
    """Score `learner` on every episode of `episodes`: adapt to the support set, predict the queries.

    Batch norm uses running statistics ("inference", the default) unless bn_mode="transductive".
    With `across_processes` in a distributed run (torchrun), every process must call this: each scores the
    episodes rank, rank + world size, ... and all of them return the result over the whole set, the same
    per-episode scores a single process gives. The calibration bin counts of each episode are gathered the
    same way, so the ECE is the same too.
    """
    device = torch.device(device) if device is not None else next(learner.parameters()).device
    group = distributed.current_group() if across_processes else None
    indices = range(len(episodes)) if group is None else range(group.rank, len(episodes), group.world_size)
    scores: list[float] = []
    counts: list[Tensor | None] = []  # each episode's calibration bin counts; None when not class scores
    start = time.perf_counter()
    with batchnorm_mode(learner, bn_mode), torch.no_grad():
        for index in progress_bar(indices, desc="evaluating", enabled=progress, leave=False):
            episode = episodes[index].to(device)
            predictor = learner.adapt(episode.support_x, episode.support_y)
            output = predictor(episode.query_x)
            scores.append(metric(output, episode.query_y))
            counts.append(bin_counts(output, episode.query_y) if is_class_logits(output, episode.query_y) else None)
    episode_counts = _stack_counts(counts, device)
    if group is not None:
        scores = distributed.gather_scores(scores, group, len(episodes), device)
        episode_counts = gather_counts(episode_counts, group.rank, group.world_size, len(episodes))
    ece, episode_ece, episode_ece_ci95 = _calibration(episode_counts)
    mean, ci = mean_ci95(scores)
    return EvaluationResult(accuracy=100 * mean, ci95=100 * ci, episodes=len(scores), ways=episodes.ways,
                            shots=episodes.shots, queries=episodes.queries, bn_mode=bn_mode,
                            seconds=time.perf_counter() - start, dataset=episodes.dataset.name,
                            seed=episodes.seed, per_episode=scores, ece=ece, episode_ece=episode_ece,
                            episode_ece_ci95=episode_ece_ci95,
                            transductive=bool(getattr(learner, "transductive", False)))


def _stack_counts(counts: list[Tensor | None], device: torch.device) -> Tensor:
    """[episodes, bins, 3] bin counts, NaN for an episode without class scores (so that every process of a
    distributed run takes part in the same gather, and a NaN anywhere means: no ECE)."""
    missing = torch.full((BINS, 3), math.nan, dtype=torch.float64, device=device)
    return torch.stack([missing if c is None else c.to(device) for c in counts]) if counts else \
        torch.zeros(0, BINS, 3, dtype=torch.float64, device=device)


def _calibration(counts: Tensor) -> tuple[float | None, float | None, float | None]:
    """ECE in percent over all queries pooled, and the mean per-episode ECE with its 95% CI (None, None, None
    when some episode's outputs were not class scores)."""
    if len(counts) == 0 or counts.isnan().any():
        return None, None, None
    per_episode = ece_from_counts(counts)
    mean, ci = mean_ci95(per_episode)
    return 100 * ece_from_counts(counts.sum(0)).item(), 100 * mean, 100 * ci
