"""The Siamese pair sampler: balanced, correct, seeded and resumable."""

from __future__ import annotations

import pytest
import torch

from kshot.data.dataset import ClassDataset
from kshot.data.pairs import PairSampler

PER_CLASS = (3, 5, 2, 4, 6)


def numbered_dataset(rotations=(0, 90, 180, 270)) -> ClassDataset:
    """Constant images whose value is their index, so every drawn image says where it came from."""
    total = sum(PER_CLASS)
    images = torch.arange(total, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 3, 3).contiguous()
    offsets = torch.tensor([0, *torch.tensor(PER_CLASS).cumsum(0).tolist()])
    return ClassDataset(images, offsets, [f"c{i}" for i in range(len(PER_CLASS))], rotations=rotations)


def test_pairs_are_balanced_and_correct():
    dataset = numbered_dataset()
    sampler = PairSampler(dataset, batch_size=64, seed=0)
    offsets = dataset.offsets
    for _ in range(5):
        classes, positions, targets = sampler.indices()
        assert targets.sum() == 32 and len(targets) == 64
        same = targets.bool()
        assert torch.equal(classes[same, 0], classes[same, 1])
        assert bool((positions[same, 0] != positions[same, 1]).all())  # never the same image twice
        assert bool((classes[~same, 0] != classes[~same, 1]).all())
        counts = dataset.counts()[classes]
        assert bool((positions >= 0).all()) and bool((positions < counts).all())
    first, second, target = sampler.sample()
    assert first.shape == second.shape == (64, 1, 3, 3) and target.dtype == torch.float32
    base_of = torch.searchsorted(offsets, (first[:, 0, 0, 0] * 255).round().long(), right=True) - 1
    base_of_second = torch.searchsorted(offsets, (second[:, 0, 0, 0] * 255).round().long(), right=True) - 1
    assert bool((base_of[target.bool()] == base_of_second[target.bool()]).all())


def test_pairs_are_seeded_and_resume_exactly():
    dataset = numbered_dataset()
    a, b = PairSampler(dataset, 16, seed=3), PairSampler(dataset, 16, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.indices(), b.indices(), strict=True))
    other = PairSampler(dataset, 16, seed=4)
    assert not torch.equal(a.indices()[0], other.indices()[0])
    state = a.state_dict()
    expected = a.indices()
    fresh = PairSampler(dataset, 16, seed=99)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(fresh.indices(), expected, strict=True))


def test_bad_requests_are_clear_errors():
    dataset = numbered_dataset()
    with pytest.raises(ValueError, match="even"):
        PairSampler(dataset, batch_size=15)
    one_class = ClassDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 4]), ["only"])
    with pytest.raises(ValueError, match="2 classes"):
        PairSampler(one_class, 8)
    single_images = ClassDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2]),
                                 ["a", "b"])
    with pytest.raises(ValueError, match="2 examples"):
        PairSampler(single_images, 8)
