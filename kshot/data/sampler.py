"""Where episodes are sampled: N-way K-shot Q-query tasks, meta-batches, and fixed evaluation episode sets.

Sampling draws class ids and within-class positions as index arrays from a seeded NumPy generator (so the same
seed gives the same episodes in any process and on any device), then gathers uint8 images in one indexing op.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kshot.data.dataset import ClassDataset
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
    counts = dataset.class_counts
    short = np.flatnonzero(counts < shots + queries)
    if len(short):
        names = dataset.class_names()
        examples = ", ".join(f"{names[i]} ({int(counts[i])})" for i in short[:5].tolist())
        raise EpisodeRequestError(
            f"{shots} shots + {queries} queries need {shots + queries} examples of every class, but "
            f"{len(short)} classes of {dataset.name} have fewer: {examples}; lower shots or queries, "
            f"or remove those classes")


def distinct_integers(rng: np.random.Generator, high: int, count: int) -> np.ndarray:
    """`count` distinct integers in [0, high), a uniformly random ordered subset.

    The first `count` distinct values of an i.i.d. uniform sequence are exactly such a subset; for the usual
    few-shot case (count much smaller than high) this costs a few microseconds where Generator.choice without
    replacement costs about fifty.
    """
    if count * 4 > high:
        return rng.permutation(high)[:count]
    chosen: dict[int, None] = {}
    while len(chosen) < count:
        for value in rng.integers(0, high, size=2 * count + 8).tolist():
            chosen.setdefault(value)
            if len(chosen) == count:
                break
    return np.fromiter(chosen, dtype=np.int64, count=count)


def draw_indices(dataset: ClassDataset, ways: int, examples: int, batch: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class ids [batch, ways] (distinct within a task, in random order) and within-class positions
    [batch, ways, examples] (distinct within a class)."""
    classes = np.stack([distinct_integers(rng, dataset.num_classes, ways) for _ in range(batch)]) if batch > 1 \
        else distinct_integers(rng, dataset.num_classes, ways)[None]
    counts = dataset.class_counts[classes]
    keys = rng.random((batch, ways, int(counts.max())))
    if dataset.uneven_counts:
        keys[np.arange(keys.shape[-1]) >= counts[..., None]] = 2.0  # positions past a class's end sort last
    picks = keys.argsort(axis=-1)[..., :examples]
    return classes, picks


class _Labels:
    """Episode labels 0..N-1 in class-major order, made once per shape and device."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensor] = {}

    def __call__(self, ways: int, per_class: int, device: torch.device) -> Tensor:
        key = (ways, per_class, device)
        if key not in self._cache:
            self._cache[key] = torch.arange(ways, device=device).repeat_interleave(per_class)
        return self._cache[key]


labels_for = _Labels()


def build_episode(dataset: ClassDataset, classes: np.ndarray, picks: np.ndarray, shots: int) -> Episode:
    """Turn drawn indices into an `Episode` (a meta-batch when `classes` is [B, N]). The first `shots` picks of
    each class are support and the rest query, so support and query never share an image."""
    ways, per_class = classes.shape[-1], picks.shape[-1]
    lead = classes.shape[:-1]
    queries = per_class - shots
    # Support images of every task first, then query images, so one gather serves both as contiguous views.
    flat_classes = classes.reshape(-1)
    order_classes = np.concatenate([flat_classes.repeat(shots), flat_classes.repeat(queries)])
    order_picks = np.concatenate([picks[..., :shots].reshape(-1), picks[..., shots:].reshape(-1)])
    images = dataset.to_model(dataset.images_at(order_classes, order_picks))
    n_support = flat_classes.size * shots
    shape = images.shape[1:]
    support_x = images[:n_support].view(*lead, ways * shots, *shape)
    query_x = images[n_support:].view(*lead, ways * queries, *shape)
    device = images.device
    support_y = labels_for(ways, shots, device).expand(*lead, ways * shots)
    query_y = labels_for(ways, queries, device).expand(*lead, ways * queries)
    return Episode(support_x, support_y, query_x, query_y, torch.from_numpy(classes).to(device))


class EpisodeSampler:
    """An endless, seeded stream of N-way K-shot Q-query episodes (or meta-batches of them) from a dataset.

    Indices come from NumPy's PCG64 generator, so a seed gives the same episodes in any process and on any device.
    """

    def __init__(self, dataset: ClassDataset, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        check_request(dataset, ways, shots, queries)
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self) -> Episode:
        """One episode."""
        classes, picks = draw_indices(self.dataset, self.ways, self.shots + self.queries, 1, self.rng)
        return build_episode(self.dataset, classes[0], picks[0], self.shots)

    def sample_batch(self, batch_size: int) -> Episode:
        """A meta-batch of `batch_size` episodes stacked along a leading dimension."""
        classes, picks = draw_indices(self.dataset, self.ways, self.shots + self.queries, batch_size, self.rng)
        return build_episode(self.dataset, classes, picks, self.shots)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


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
        rng = np.random.Generator(np.random.PCG64(seed))
        self.classes, self.picks = draw_indices(dataset, ways, shots + queries, count, rng)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Episode:
        if not -self.count <= index < self.count:
            raise IndexError(f"episode {index} out of range for a set of {self.count}")
        return build_episode(self.dataset, self.classes[index], self.picks[index], self.shots)

    def __iter__(self) -> Iterator[Episode]:
        for index in range(self.count):
            yield self[index]

    def gather(self, indices: Sequence[int] | np.ndarray) -> Episode:
        """The episodes at `indices` (in that order) as one meta-batch [E, ...], with the images of all of them
        gathered by one indexing op and converted to the model's input once: the evaluator reads a chunk of
        episodes this way instead of building every episode's tensors on its own. Episode e of the result is
        exactly `self[indices[e]]`."""
        index = np.asarray(indices, dtype=np.int64)
        if index.ndim != 1 or len(index) == 0:
            raise ValueError(f"gather takes a non-empty list of episode indices, got shape {index.shape}")
        outside = index[(index < -self.count) | (index >= self.count)]
        if len(outside):
            raise IndexError(f"episode {int(outside[0])} out of range for a set of {self.count}")
        return build_episode(self.dataset, self.classes[index], self.picks[index], self.shots)

    def batches(self, batch_size: int) -> Iterator[Episode]:
        """The episodes in order, as meta-batches of up to `batch_size`."""
        for start in range(0, self.count, batch_size):
            yield self.gather(np.arange(start, min(start + batch_size, self.count)))

    def description(self) -> dict[str, Any]:
        """What identifies these episodes, for results files."""
        return {"dataset": self.dataset.name, "dataset_fingerprint": self.dataset.fingerprint(),
                "ways": self.ways, "shots": self.shots, "queries": self.queries, "episodes": self.count,
                "seed": self.seed}
