"""The sinusoid regression tasks of the MAML paper (Finn et al., 2017, section 5.1): y = A sin(x - phase) with
A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5], as `Episode`s (inputs and targets [K, 1]; `classes` holds the
task parameters [amplitude, phase]), drawn from a seeded generator, singly or as meta-batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from kshot.episode import Episode


class SinusoidTasks:
    """A family of sinusoid tasks; `sample(K, Q)` draws one task with K support and Q query points."""

    name = "sinusoid"

    def __init__(self, amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        for label, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low < high:
                raise ValueError(f"{label} must be a (low, high) range with low < high, got {(low, high)}")
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    @staticmethod
    def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(shape, generator=generator)

    def tasks(self, count: int, generator: torch.Generator) -> Tensor:
        """Task parameters [count, 2]: amplitude and phase."""
        return torch.stack([self._uniform((count,), self.amplitude, generator),
                            self._uniform((count,), self.phase, generator)], dim=1)

    def episodes(self, params: Tensor, shots: int, queries: int, generator: torch.Generator) -> Episode:
        """Points of the tasks `params` [B, 2]: a meta-batch Episode with x, y of shape [B, K or Q, 1]."""
        if shots < 1 or queries < 0:
            raise ValueError(f"need shots >= 1 and queries >= 0, got {shots} and {queries}")
        x = self._uniform((len(params), shots + queries, 1), self.x_range, generator)
        y = self.function(params, x)
        return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], params)

    @staticmethod
    def function(params: Tensor, x: Tensor) -> Tensor:
        """The task functions A sin(x - phase) of `params` [B, 2] at points x [B, M, 1]."""
        return params[:, 0, None, None] * torch.sin(x - params[:, 1, None, None])

    def sample(self, shots: int, queries: int, generator: torch.Generator) -> Episode:
        """One task with `shots` support and `queries` query points (a single, unbatched Episode)."""
        batch = self.sample_batch(1, shots, queries, generator)
        return Episode(*(t[0] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                                         batch.classes)))

    def sample_batch(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> Episode:
        """A meta-batch of `batch_size` tasks."""
        return self.episodes(self.tasks(batch_size, generator), shots, queries, generator)

    def stream(self, shape: Any, seed: int) -> SinusoidStream:
        """Endless training tasks of `shape` (an EpisodeShape: shots, queries, meta_batch; ways is ignored)."""
        return SinusoidStream(self, shape.shots, shape.queries, shape.meta_batch, seed)

    def test_set(self, count: int, shots: int, queries: int, seed: int = 0) -> Episode:
        """A fixed, seeded meta-batch of `count` test tasks."""
        return self.sample_batch(count, shots, queries, torch.Generator().manual_seed(seed))


class SinusoidStream:
    """Seeded, resumable stream of sinusoid meta-batches (or single tasks when meta_batch is 1)."""

    def __init__(self, tasks: SinusoidTasks, shots: int, queries: int, meta_batch: int, seed: int) -> None:
        self.tasks, self.shots, self.queries, self.meta_batch = tasks, shots, queries, meta_batch
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Episode]:
        return self

    def __next__(self) -> Episode:
        if self.meta_batch == 1:
            return self.tasks.sample(self.shots, self.queries, self.generator)
        return self.tasks.sample_batch(self.meta_batch, self.shots, self.queries, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
