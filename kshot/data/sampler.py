"""Where episodes are sampled: N-way K-shot Q-query tasks, meta-batches, and fixed evaluation episode sets.

Sampling draws class ids and within-class positions as index tensors from a seeded CPU generator (so the same
seed gives the same episodes in any process and on any device), then gathers uint8 images in one indexing op.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from kshot.data.dataset import ClassDataset, to_float
from kshot.episode import Episode


class EpisodeRequestError(ValueError):
    """An episode shape that the dataset cannot provide."""


def check_request(dataset: ClassDataset, ways: int, shots: int, queries: int) -> None:
    """Raise a clear error when N-way K-shot Q-query episodes cannot be drawn from `dataset`."""
    for label, value, least in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
        if not isinstance(value, int) or value < least:
            raise EpisodeRequestError(f"{label} must be an integer >= {least}, got {value!r}")
    if ways > dataset.num_classes:
        raise EpisodeRequestError(
            f"{ways}-way episodes need {ways} classes but {dataset.name} has only {dataset.num_classes}; "
            f"lower ways or use a larger split")
    counts = dataset.counts()
    short = (counts < shots + queries).nonzero().flatten()
    if len(short):
        names = dataset.class_names()
        examples = ", ".join(f"{names[i]} ({int(counts[i])})" for i in short[:5].tolist())
        raise EpisodeRequestError(
            f"{shots} shots + {queries} queries need {shots + queries} examples of every class, but "
            f"{len(short)} classes of {dataset.name} have fewer: {examples}; lower shots or queries, "
            f"or remove those classes")


def draw_indices(dataset: ClassDataset, ways: int, examples: int, batch: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Class ids [batch, ways] (distinct within a task) and positions [batch, ways, examples] (distinct per class)."""
    classes = torch.rand(batch, dataset.num_classes, generator=generator).argsort(dim=1)[:, :ways]
    counts = dataset.counts()[classes]
    max_count = int(counts.max())
    keys = torch.rand(batch, ways, max_count, generator=generator)
    if bool((counts != max_count).any()):
        keys.masked_fill_(torch.arange(max_count) >= counts.unsqueeze(-1), 2.0)
    picks = keys.argsort(dim=-1)[..., :examples]
    return classes, picks


def build_episode(dataset: ClassDataset, classes: Tensor, picks: Tensor, shots: int) -> Episode:
    """Turn drawn indices into an `Episode` (batched when `classes` is [B, N]); the first `shots` picks of
    each class are support, the rest query, so support and query never share an image."""
    images = to_float(dataset.gather(classes, picks))  # [..., N, S, C, H, W]
    ways = classes.shape[-1]
    lead = classes.shape[:-1]
    queries = picks.shape[-1] - shots
    labels = torch.arange(ways, device=images.device)
    support_x = images[..., :shots, :, :, :].reshape(*lead, ways * shots, *images.shape[-3:])
    query_x = images[..., shots:, :, :, :].reshape(*lead, ways * queries, *images.shape[-3:])
    support_y = labels.repeat_interleave(shots).expand(*lead, ways * shots)
    query_y = labels.repeat_interleave(queries).expand(*lead, ways * queries)
    return Episode(support_x, support_y, query_x, query_y, classes.to(images.device))


class EpisodeSampler:
    """An endless, seeded stream of N-way K-shot Q-query episodes (or meta-batches of them) from a dataset."""

    def __init__(self, dataset: ClassDataset, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        check_request(dataset, ways, shots, queries)
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Episode:
        """One episode."""
        classes, picks = draw_indices(self.dataset, self.ways, self.shots + self.queries, 1, self.generator)
        return build_episode(self.dataset, classes[0], picks[0], self.shots)

    def sample_batch(self, batch_size: int) -> Episode:
        """A meta-batch of `batch_size` episodes stacked along a leading dimension."""
        classes, picks = draw_indices(self.dataset, self.ways, self.shots + self.queries, batch_size,
                                      self.generator)
        return build_episode(self.dataset, classes, picks, self.shots)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class EpisodeSet:
    """A fixed list of evaluation episodes: a pure function of (dataset, N, K, Q, count, seed).

    Only the indices are stored; two learners evaluated on the same EpisodeSet see exactly the same images.
    """

    def __init__(self, dataset: ClassDataset, ways: int, shots: int, queries: int, count: int,
                 seed: int = 0) -> None:
        check_request(dataset, ways, shots, queries)
        if count < 1:
            raise EpisodeRequestError(f"an episode set needs count >= 1, got {count}")
        self.dataset, self.ways, self.shots, self.queries, self.count, self.seed = \
            dataset, ways, shots, queries, count, seed
        generator = torch.Generator().manual_seed(seed)
        self.classes, self.picks = draw_indices(dataset, ways, shots + queries, count, generator)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Episode:
        if not -self.count <= index < self.count:
            raise IndexError(f"episode {index} out of range for a set of {self.count}")
        return build_episode(self.dataset, self.classes[index], self.picks[index], self.shots)

    def __iter__(self) -> Iterator[Episode]:
        for index in range(self.count):
            yield self[index]

    def batches(self, batch_size: int) -> Iterator[Episode]:
        """The episodes in order, as meta-batches of up to `batch_size`."""
        for start in range(0, self.count, batch_size):
            stop = min(start + batch_size, self.count)
            yield build_episode(self.dataset, self.classes[start:stop], self.picks[start:stop], self.shots)

    def description(self) -> dict[str, Any]:
        """What identifies these episodes, for results files."""
        return {"dataset": self.dataset.name, "dataset_fingerprint": self.dataset.fingerprint(),
                "ways": self.ways, "shots": self.shots, "queries": self.queries, "episodes": self.count,
                "seed": self.seed}
