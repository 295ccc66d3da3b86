"""Same/different image pairs for Siamese networks (Koch et al. 2015), drawn by index from a `ClassDataset`.

Every batch holds exactly half "same class" and half "different class" pairs, in a seeded random order; the
generator's state is the whole sampler state, so a stopped training run resumes on the same pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kshot.data.dataset import ClassDataset


class PairSampler:
    """An endless, seeded stream of balanced pair batches: (first [P, C, H, W], second, same [P] 0 or 1)."""

    def __init__(self, dataset: ClassDataset, batch_size: int = 128, seed: int = 0) -> None:
        if not isinstance(batch_size, int) or batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be an even integer >= 2 (half same, half different pairs), "
                             f"got {batch_size!r}")
        if dataset.num_classes < 2:
            raise ValueError(f"pairs need at least 2 classes, but {dataset.name} has {dataset.num_classes}")
        counts = dataset.counts()
        if bool((counts < 2).any()):
            short = int((counts < 2).sum())
            raise ValueError(f"same-class pairs need 2 examples of every class, but {short} classes of "
                             f"{dataset.name} have fewer; remove them")
        self.dataset, self.batch_size = dataset, batch_size
        self.counts = counts
        self.generator = torch.Generator().manual_seed(seed)

    def _position(self, classes: Tensor) -> Tensor:
        """A uniformly drawn within-class position [P] for each class id."""
        counts = self.counts[classes]
        return (torch.rand(len(classes), generator=self.generator) * counts).long().minimum(counts - 1)

    def _two_positions(self, classes: Tensor) -> Tensor:
        """Two distinct within-class positions [P, 2] for each class id."""
        first = self._position(classes)
        others = self.counts[classes] - 1
        second = (torch.rand(len(classes), generator=self.generator) * others).long().minimum(others - 1)
        second = second + (second >= first).long()  # skip over `first`
        return torch.stack([first, second], dim=1)

    def indices(self) -> tuple[Tensor, Tensor, Tensor]:
        """Class ids [P, 2], positions [P, 2] and targets [P] of the next batch (no images gathered)."""
        half = self.batch_size // 2
        num_classes = self.dataset.num_classes
        same = torch.randint(num_classes, (half,), generator=self.generator)
        first = torch.randint(num_classes, (half,), generator=self.generator)
        other = torch.randint(num_classes - 1, (half,), generator=self.generator)
        other = other + (other >= first).long()
        classes = torch.cat([same.unsqueeze(1).expand(half, 2), torch.stack([first, other], dim=1)])
        positions = torch.cat([self._two_positions(same),
                               torch.stack([self._position(first), self._position(other)], dim=1)])
        targets = torch.cat([torch.ones(half), torch.zeros(half)])
        order = torch.randperm(self.batch_size, generator=self.generator)
        return classes[order], positions[order], targets[order]

    def sample(self) -> tuple[Tensor, Tensor, Tensor]:
        """The next batch of pairs as float images in [0, 1] and float targets (1 = same class)."""
        classes, positions, targets = self.indices()
        images = self.dataset.to_model(self.dataset.gather(classes.reshape(-1), positions.reshape(-1, 1)))[:, 0]
        images = images.reshape(self.batch_size, 2, *images.shape[1:])
        return images[:, 0], images[:, 1], targets.to(images.device)

    def __iter__(self) -> PairSampler:
        return self

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
