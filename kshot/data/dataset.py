"""A class-indexed image dataset held as one uint8 tensor, with rotations as extra classes.

Images are stored sorted by class, so the examples of class c are images[offsets[c]:offsets[c+1]]: sampling
an episode is then pure index arithmetic on tensors, with no Python list of images anywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from kshot.data.contract import InputContract

ROTATIONS = (0, 90, 180, 270)


class ClassDataset:
    """Images of `len(base_names)` classes, each optionally seen in several rotations as separate classes.

    Class id v stands for base class v // R in rotation rotations[v % R] (R = len(rotations)); its name is
    "<base name>/rotDDD" when R > 1 or the rotation is not 0, and the base name otherwise.
    """

    def __init__(
        self,
        images: Tensor,
        offsets: Tensor,
        base_names: Sequence[str],
        rotations: Sequence[int] = (0,),
        name: str = "dataset",
        contract: InputContract | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [count, channels, height, width], got "
                             f"{images.dtype} {tuple(images.shape)}")
        offsets = torch.as_tensor(offsets, dtype=torch.long).cpu()
        if offsets.dim() != 1 or len(offsets) != len(base_names) + 1 or offsets[0] != 0 \
                or offsets[-1] != len(images) or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing, start at 0, end at len(images), "
                             "and have one entry more than base_names")
        bad = [r for r in rotations if r % 90 != 0]
        if bad or not rotations:
            raise ValueError(f"rotations must be multiples of 90 degrees, got {list(rotations)}")
        if images.shape[-1] != images.shape[-2] and any(r % 180 for r in rotations):
            raise ValueError("rotating by 90 or 270 degrees needs square images")
        self.images = images
        self.offsets = offsets
        self.base_names = list(base_names)
        self.rotations = tuple(int(r) % 360 for r in rotations)
        self.name = name
        self.contract = contract
        """How this dataset's files were decoded (None for tensors given directly); models record it."""
        if contract is not None and tuple(images.shape[1:]) != contract.image_shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not match their input contract "
                             f"({contract.describe()})")
        # Index tables as NumPy arrays: sampling reads them for every episode, and NumPy ops on tiny arrays cost
        # a fraction of torch's per-op overhead.
        self._offsets_np = self.offsets.numpy()
        self._turns_np = np.array([r // 90 for r in self.rotations], dtype=np.int64)
        self.class_counts = np.diff(self._offsets_np).repeat(len(self.rotations))
        self.uneven_counts = bool(len(self.class_counts)) and bool((self.class_counts != self.class_counts.max()).any())
        self._rotated_pixels = torch.from_numpy(rotated_pixel_index(tuple(images.shape[1:])))

    # ----------------------------------------------------------------------------------------------- facts
    @property
    def num_base_classes(self) -> int:
        return len(self.base_names)

    @property
    def num_classes(self) -> int:
        return self.num_base_classes * len(self.rotations)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def counts(self) -> Tensor:
        """Examples per class id (rotated copies of a class have the same count)."""
        return torch.from_numpy(self.class_counts)

    def class_names(self) -> list[str]:
        if self.rotations == (0,):
            return list(self.base_names)
        return [f"{base}/rot{rot:03d}" for base in self.base_names for rot in self.rotations]

    def __len__(self) -> int:
        return len(self.images) * len(self.rotations)

    def __repr__(self) -> str:
        return (f"ClassDataset({self.name!r}, classes={self.num_classes}, base_classes={self.num_base_classes}, "
                f"rotations={self.rotations}, images={len(self.images)}, shape={self.image_shape})")

    def fingerprint(self) -> str:
        """A short content hash: two datasets with the same fingerprint give the same episodes for a seed."""
        digest = hashlib.sha256()
        digest.update(repr((self.image_shape, self.rotations, self.base_names)).encode())
        digest.update(self.offsets.cpu().numpy().tobytes())
        digest.update(self.images.cpu().contiguous().view(-1)[:: max(1, self.images.numel() // 1_000_000)]
                      .numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---------------------------------------------------------------------------------------- transforms
    def to(self, device: torch.device | str) -> ClassDataset:
        """The same dataset with its images on `device`, so that episodes are gathered there."""
        return ClassDataset(self.images.to(device), self.offsets, self.base_names, self.rotations, self.name,
                            self.contract)

    def with_rotations(self, rotations: Sequence[int] = ROTATIONS) -> ClassDataset:
        """Class augmentation: each rotation of each base class becomes a class of its own."""
        return ClassDataset(self.images, self.offsets, self.base_names, rotations, self.name, self.contract)

    def subset(self, base_classes: Sequence[int] | Tensor, name: str | None = None) -> ClassDataset:
        """A dataset of some base classes only (ids renumbered 0..len-1 in the order given)."""
        ids = torch.as_tensor(base_classes, dtype=torch.long)
        starts, ends = self.offsets[ids], self.offsets[ids + 1]
        index = torch.cat([torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())]) \
            if len(ids) else torch.zeros(0, dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), (ends - starts).cumsum(0)])
        return ClassDataset(self.images[index.to(self.device)], offsets, [self.base_names[i] for i in ids.tolist()],
                            self.rotations, name or self.name, self.contract)

    def to_model(self, images: Tensor) -> Tensor:
        """uint8 images of this dataset as the network's float input (its contract's scale and normalisation)."""
        return self.contract.to_model(images) if self.contract is not None else to_float(images)

    # ---------------------------------------------------------------------------------------- gathering
    def images_at(self, classes: np.ndarray, positions: np.ndarray) -> Tensor:
        """uint8 images [M, C, H, W] of class ids `classes` [M] at within-class `positions` [M], rotated as
        their class says. This is the sampling hot path: one index_select, and for rotations one gather of a
        per-image pixel permutation (measured faster than rot90 per rotation group, in torch or NumPy)."""
        rotations = len(self.rotations)
        index = self._offsets_np[classes // rotations] + positions
        images = self.images.index_select(0, torch.from_numpy(index).to(self.device))
        if self.rotations == (0,):
            return images
        if self._rotated_pixels.device != self.device:
            self._rotated_pixels = self._rotated_pixels.to(self.device)
        turns = torch.from_numpy(self._turns_np[classes % rotations]).to(self.device)
        source = self._rotated_pixels.index_select(0, turns)  # [M, C*H*W]
        return images.view(len(index), -1).gather(1, source).view_as(images)

    def gather(self, classes: Tensor | np.ndarray, picks: Tensor | np.ndarray) -> Tensor:
        """Images for class ids `classes` [..., N] and within-class positions `picks` [..., N, S]:
        uint8 [..., N, S, C, H, W]."""
        classes, picks = np.asarray(classes, dtype=np.int64), np.asarray(picks, dtype=np.int64)
        expanded = np.broadcast_to(classes[..., None], picks.shape)
        images = self.images_at(expanded.reshape(-1), picks.reshape(-1))
        return images.view(*picks.shape, *self.images.shape[1:])

    def all_images(self) -> tuple[Tensor, Tensor]:
        """Every (image, class id) pair, rotations included: uint8 images [M, C, H, W] and labels [M]."""
        counts = self.counts()
        classes = torch.arange(self.num_classes)
        max_count = int(counts.max()) if len(counts) else 0
        picks = torch.arange(max_count).expand(self.num_classes, max_count)
        valid = picks < counts.unsqueeze(1)
        picks = torch.where(valid, picks, 0)
        images = self.gather(classes.numpy(), picks.numpy())
        labels = classes.unsqueeze(1).expand_as(picks)
        return images[valid.to(self.device)], labels[valid]


def rotated_pixel_index(shape: tuple[int, ...]) -> np.ndarray:
    """For k quarter turns (k = 0..3), the flat source index within one image [C, H, W] of each output element:
    an int64 array [4, C*H*W] (empty for non-square images, which are never rotated by 90 degrees)."""
    channels, height, width = shape
    if height != width:
        return np.zeros((4, 0), dtype=np.int64)
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)
    planes = np.arange(channels, dtype=np.int64)[:, None] * height * width
    return np.stack([(planes + np.rot90(grid, k).reshape(1, -1)).reshape(-1) for k in range(4)])


def to_float(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] to float32 in [0, 1], in one op."""
    return images.mul(1.0 / 255.0) if images.dtype == torch.uint8 else images.to(torch.float32)


def check_split_and_size(dataset: str, split: str | None = None, splits: Sequence[str] = (),
                         image_size: int | None = None) -> None:
    """The one check every dataset loader makes of what it is asked for, before anything is read or converted: a
    known split (when `split` is given) and images of at least 4 pixels (when `image_size` is given)."""
    if split is not None and split not in splits:
        raise ValueError(f"unknown {dataset} split {split!r}; choose one of {', '.join(splits)}")
    if image_size is not None and image_size < 4:
        raise ValueError(f"image_size must be at least 4 pixels, got {image_size}")
