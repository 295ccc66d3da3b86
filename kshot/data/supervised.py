"""Plain supervised batches over all classes of a `ClassDataset` (rotations included), for the pretraining
of Baseline, Baseline++ and SimpleShot: (images, class ids) drawn uniformly, seeded and resumable."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kshot.data.dataset import ClassDataset


class SupervisedStream:
    """An endless, seeded stream of (images [B, C, H, W] float in [0, 1], labels [B]) batches.

    Examples are drawn uniformly with replacement over every (image, rotation) of the dataset; the labels are
    the dataset's class ids 0..num_classes-1, so a classifier head over `dataset.num_classes` fits them.
    """

    def __init__(self, dataset: ClassDataset, batch_size: int = 128, seed: int = 0) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(dataset) == 0:
            raise ValueError(f"{dataset.name} holds no images to train on")
        self.dataset, self.batch_size = dataset, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def indices(self) -> tuple[Tensor, Tensor]:
        """Class ids [B] and within-class positions [B] of the next batch."""
        rotations = len(self.dataset.rotations)
        flat = torch.randint(len(self.dataset), (self.batch_size,), generator=self.generator)
        image, rotation = flat // rotations, flat % rotations
        base = torch.searchsorted(self.dataset.offsets, image, right=True) - 1
        return base * rotations + rotation, image - self.dataset.offsets[base]

    def __iter__(self) -> SupervisedStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        classes, positions = self.indices()
        images = self.dataset.to_model(self.dataset.gather(classes, positions.unsqueeze(1)))[:, 0]
        return images, classes.to(images.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
