"""Shared fixtures: small synthetic datasets (no download) and the local Omniglot archives when available."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kshot.data import ClassDataset


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny tensors, for which one thread is faster than two (and steadier on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_dataset(classes: int = 12, per_class: int | list[int] = 8, size: int = 12, channels: int = 1,
                      seed: int = 0, noise: int = 40) -> ClassDataset:
    """Learnable toy data: each class is a fixed random pattern plus per-image noise."""
    generator = torch.Generator().manual_seed(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * classes
    patterns = torch.randint(0, 256, (classes, channels, size, size), generator=generator)
    images = []
    for c, count in enumerate(counts):
        jitter = torch.randint(-noise, noise + 1, (count, channels, size, size), generator=generator)
        images.append((patterns[c] + jitter).clamp(0, 255))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)])
    return ClassDataset(torch.cat(images).to(torch.uint8), offsets, [f"class{c:02d}" for c in range(classes)],
                        name="synthetic")


@pytest.fixture
def toy() -> ClassDataset:
    return synthetic_dataset()


@pytest.fixture(scope="session")
def omniglot_archives() -> Path:
    """The folder of local Omniglot archives named by KSHOT_OMNIGLOT_ARCHIVES (skips when unset)."""
    folder = os.environ.get("KSHOT_OMNIGLOT_ARCHIVES")
    if not folder or not (Path(folder) / "images_background.zip").is_file():
        pytest.skip("set KSHOT_OMNIGLOT_ARCHIVES to a folder holding the Omniglot archives")
    return Path(folder)
