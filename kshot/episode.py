"""The one episode type: a support set and a query set, labels remapped to 0..N-1, original class ids kept.

An `Episode` is either a single task (support_x: [N*K, ...]) or a meta-batch of B tasks stacked along a
leading dimension (support_x: [B, N*K, ...]); every learner, the trainer and the evaluator use this type.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class Episode:
    """An N-way K-shot Q-query task, or a stack of them (see `is_batched`).

    support_y and query_y hold episode labels 0..N-1 (class-major order); `classes[i]` is the dataset's class
    id behind episode label i, so a prediction can always be mapped back to a real class.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor

    @property
    def is_batched(self) -> bool:
        return self.classes.dim() == 2

    @property
    def ways(self) -> int:
        return self.classes.shape[-1]

    @property
    def shots(self) -> int:
        return self.support_y.shape[-1] // self.ways

    @property
    def queries(self) -> int:
        return self.query_y.shape[-1] // self.ways

    @property
    def batch_size(self) -> int:
        return self.classes.shape[0] if self.is_batched else 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """The same episode with every tensor on `device`."""
        return Episode(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def unbind(self) -> list[Episode]:
        """The tasks of a meta-batch as single episodes (a single episode gives a list of itself)."""
        if not self.is_batched:
            return [self]
        parts = [getattr(self, f.name).unbind(0) for f in fields(self)]
        return [Episode(*task) for task in zip(*parts)]

    def __iter__(self) -> Iterator[Episode]:
        return iter(self.unbind())

    @staticmethod
    def stack(episodes: Sequence[Episode]) -> Episode:
        """Stack single episodes of the same shape into a meta-batch."""
        if not episodes:
            raise ValueError("Episode.stack needs at least one episode")
        if any(e.is_batched for e in episodes):
            raise ValueError("Episode.stack takes single episodes; concatenate meta-batches with torch.cat")
        shapes = {(e.support_x.shape, e.query_x.shape) for e in episodes}
        if len(shapes) > 1:
            raise ValueError(f"cannot stack episodes of different shapes: {sorted(map(str, shapes))}")
        return Episode(*(torch.stack([getattr(e, f.name) for e in episodes]) for f in fields(Episode)))
