"""Evaluation as papers report it: mean accuracy and 95% confidence interval over a fixed episode set, with the
expected calibration error of classifiers' confidence (`kshot.calibration`) on the same episodes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kshot import distributed
from kshot.batchnorm import batchnorm_mode
from kshot.calibration import BINS, bin_counts, ece_from_counts, gather_counts, is_class_logits
from kshot.data.sampler import EpisodeSet
from kshot.episode import Episode
from kshot.inference import inference_backbone
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
             across_processes: bool = False, episodes_per_batch: int | None = None,
             fast_backbone: bool = True) -> EvaluationResult:
    """Score `learner` on every episode of `episodes`: adapt to the support set, predict the queries.

    Batch norm uses running statistics ("inference", the default) unless bn_mode="transductive".
    With `across_processes` in a distributed run (torchrun), every process must call this: each scores the
    episodes rank, rank + world size, ... and all of them return the result over the whole set, the same
    per-episode scores a single process gives. The calibration bin counts of each episode are gathered the
    same way, so the ECE is the same too.

    Episodes are read `episodes_per_batch` at a time (None: as many as one backbone pass holds, `EMBED_BUDGET`,
    at least one), their images gathered in one indexing op. For a `works_on_features` learner in "inference"
    mode an image's features do not depend on the rest of its batch, so the support and query images of the
    whole chunk go through the backbone together (`Learner.embed`, in passes of at most `EMBED_BUDGET`), and
    each episode is fitted and scored on its own slice of the features (`adapt_embedded`; a transductive
    predictor gets its episode's whole query set).
    Other learners, and transductive batch norm, adapt episode by episode. With `fast_backbone` the batched
    path embeds with an inference copy of the backbone (`kshot.inference`: batch norm folded into the
    convolutions, activations moved after max-pooling, channels-last on the CPU), which changes float rounding
    only; the backbone given is not touched, and is used instead when it has forward hooks or when the copy
    fails (such as a `.view` of a channels-last feature map).
    """
    if episodes_per_batch is not None and (isinstance(episodes_per_batch, bool) or
                                           not isinstance(episodes_per_batch, int) or episodes_per_batch < 1):
        raise ValueError(f"episodes_per_batch must be a positive integer or None, got {episodes_per_batch!r}")
    device = torch.device(device) if device is not None else next(learner.parameters()).device
    group = distributed.current_group() if across_processes else None
    indices = range(len(episodes)) if group is None else range(group.rank, len(episodes), group.world_size)
    per_batch = episodes_per_batch or default_episodes_per_batch(episodes, device)
    on_features = bool(getattr(learner, "works_on_features", False)) and bn_mode == "inference"
    embedder = _Embedder(learner, device, fast_backbone) if on_features else None
    scores: list[float] = []
    counts: list[Tensor | None] = []  # each episode's calibration bin counts; None when not class scores
    start = time.perf_counter()
    with batchnorm_mode(learner, bn_mode), torch.no_grad(), embedder or nullcontext(), \
            progress_bar(total=len(indices), desc="evaluating", enabled=progress, leave=False) as bar:
        for first in range(0, len(indices), per_batch):
            batch = _read(episodes, indices[first:first + per_batch]).to(device)
            outputs = embedder.predict(batch) if embedder is not None else \
                (learner.adapt(task.support_x, task.support_y)(task.query_x) for task in batch.unbind())
            for output, query_y in zip(outputs, batch.query_y, strict=True):
                scores.append(metric(output, query_y))
                counts.append(bin_counts(output, query_y) if is_class_logits(output, query_y) else None)
            bar.update(batch.batch_size)
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


EMBED_BUDGET = {"cpu": 640 * 28 * 28, "cuda": 4096 * 28 * 28}
"""Input values (images x channels x height x width) that one backbone pass of evaluation's batched path takes
at most, by device type (others as the CPU): on the CPU 640 Omniglot images (8 episodes of 5-way 1-shot with 15
queries a class, 2 of 20-way) or 23 of 84x84 colour images. Measured on this project's shared 2-core CPU with a
Conv-4 ProtoNet on Omniglot (kshot's malloc tuning on, channels-last): on one thread 640-image passes scored
40-41 episodes/s against 36-38 for 80- and 160-image passes, and 1,280 no more; on two threads (noisy) the best
rounds were 83 episodes/s at 640, 66 at 160, 71 at 1,280. The activations of a pass (Conv-4's first block: about
200 KB a 28x28 image for each layer output) stay in the process with kshot's malloc tuning (`kshot.allocator`);
under glibc's defaults they are page-faulted in afresh every pass, as they were episode by episode before. On a
GPU larger passes pay; the CUDA figure is not measured."""


def images_per_pass(image_shape: tuple[int, ...], device: torch.device) -> int:
    """How many images of `image_shape` one backbone pass takes on `device` (`EMBED_BUDGET`; at least one)."""
    return max(1, EMBED_BUDGET.get(device.type, EMBED_BUDGET["cpu"]) // math.prod(image_shape))


def default_episodes_per_batch(episodes: EpisodeSet, device: torch.device) -> int:
    """How many episodes of `episodes` one backbone pass holds on `device` (at least one; one for a set of
    episodes other than an `EpisodeSet`, whose episodes need not share a shape)."""
    if not hasattr(episodes, "gather"):
        return 1
    per_episode = episodes.ways * (episodes.shots + episodes.queries)
    return max(1, images_per_pass(episodes.dataset.image_shape, device) // per_episode)


def _read(episodes: EpisodeSet, indices: range) -> Episode:
    """The episodes at `indices` as one meta-batch: gathered in one indexing op from an `EpisodeSet`, stacked
    one by one from any other sequence of episodes (such as a fixed set of regression tasks)."""
    if hasattr(episodes, "gather"):
        return episodes.gather(indices)
    return Episode.stack([episodes[index] for index in indices])


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class _Embedder:
    """The batched path of `evaluate`: one backbone pass over a chunk of episodes, then each episode's fit on
    its slice of the features. Used as a `with` block, inside which the learner's backbone is, when asked for,
    its inference copy (`kshot.inference`); the backbone given is put back after it."""

    def __init__(self, learner: Learner, device: torch.device, fast_backbone: bool) -> None:
        self.learner, self.device = learner, device
        self.fast = fast_backbone and not _has_hooks(learner.backbone)  # hooks must see the module they are on
        self.channels_last = device.type == "cpu"
        self.given: nn.Module | None = None

    def __enter__(self) -> _Embedder:
        if self.fast:
            try:
                fast = inference_backbone(self.learner.backbone, channels_last=self.channels_last)
            except Exception:  # a module that cannot be deep-copied, say: evaluate with the backbone as given
                return self
            self.given, self.learner.backbone = self.learner.backbone, fast
        return self

    def __exit__(self, *exc: object) -> None:
        self.give_back()

    def give_back(self) -> None:
        """Put the backbone given back in place of its inference copy (for good)."""
        if self.given is not None:
            self.learner.backbone, self.given = self.given, None

    def embed(self, images: Tensor) -> Tensor:
        if self.given is None:
            return self.learner.embed(images)
        try:
            laid_out = images.contiguous(memory_format=torch.channels_last) \
                if self.channels_last and images.dim() == 4 else images
            return self.learner.embed(laid_out)
        except RuntimeError:  # e.g. a `.view` of a channels-last feature map: the backbone as given
            self.give_back()
            return self.learner.embed(images)

    def predict(self, batch: Episode) -> Iterator[Tensor]:
        """The outputs of each episode of the meta-batch `batch`, in order."""
        support_x, query_x = batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)
        images = torch.cat([support_x, query_x])
        per_pass = images_per_pass(tuple(images.shape[1:]), self.device)
        features = self.embed(images) if len(images) <= per_pass else \
            torch.cat([self.embed(part) for part in images.split(per_pass)])
        support = features[: len(support_x)].unflatten(0, batch.support_x.shape[:2])
        query = features[len(support_x):].unflatten(0, batch.query_x.shape[:2])
        for task_support, support_y, task_query in zip(support, batch.support_y, query, strict=True):
            yield self.learner.adapt_embedded(task_support, support_y)(task_query)


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
