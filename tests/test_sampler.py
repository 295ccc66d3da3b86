"""Episode sampling: shapes, label remapping, no leakage, seeding, meta-batches, rotations, clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import synthetic_dataset

from kshot.data import EpisodeRequestError, EpisodeSampler, EpisodeSet, to_float
from kshot.data.sampler import draw_indices
from kshot.episode import Episode


def test_episode_shapes_and_labels(toy):
    episode = EpisodeSampler(toy, ways=5, shots=2, queries=3, seed=1).sample()
    assert episode.support_x.shape == (10, 1, 12, 12) and episode.query_x.shape == (15, 1, 12, 12)
    assert episode.support_x.dtype == torch.float32 and 0 <= episode.support_x.min() <= episode.support_x.max() <= 1
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert episode.query_y.tolist() == sum(([c] * 3 for c in range(5)), [])
    assert len(set(episode.classes.tolist())) == 5
    assert (episode.ways, episode.shots, episode.queries) == (5, 2, 3)


def _rows(images):
    return {tuple(img.flatten().tolist()) for img in images}


def test_support_and_query_images_come_from_the_labelled_class_and_never_overlap():
    # Every image unique, so an image identifies its dataset index and class.
    data = synthetic_dataset(classes=6, per_class=10, size=6, noise=120, seed=3)
    index_of = {tuple(img.flatten().tolist()): i for i, img in enumerate(to_float(data.images))}
    assert len(index_of) == len(data.images)
    sampler = EpisodeSampler(data, ways=4, shots=3, queries=5, seed=0)
    for _ in range(50):
        e = sampler.sample()
        support = [index_of[tuple(x.flatten().tolist())] for x in e.support_x]
        query = [index_of[tuple(x.flatten().tolist())] for x in e.query_x]
        assert not set(support) & set(query), "support and query share an image"
        assert len(set(support)) == len(support) and len(set(query)) == len(query)
        for position, label in zip(support + query, torch.cat([e.support_y, e.query_y]).tolist()):
            assert position // 10 == e.classes[label].item(), "an image carries another class's label"


def test_same_seed_same_episodes_and_other_seed_differs(toy):
    first_episode = EpisodeSampler(toy, 5, 1, 2, seed=7).sample()
    first, second = EpisodeSampler(toy, 5, 1, 2, seed=7), EpisodeSampler(toy, 5, 1, 2, seed=7)
    for _ in range(5):
        x, y = first.sample(), second.sample()
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.classes, y.classes)
    other = EpisodeSampler(toy, 5, 1, 2, seed=8).sample()
    assert not torch.equal(first_episode.classes, other.classes)


def test_same_seed_same_episodes_in_another_process():
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import synthetic_dataset; "
            "from kshot.data import EpisodeSet; s = EpisodeSet(synthetic_dataset(), 5, 2, 3, 4, seed=11); "
            "print(s.classes.tolist(), s.picks.tolist())")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(2)}
    local = EpisodeSet(synthetic_dataset(), 5, 2, 3, 4, seed=11)
    assert outputs == {f"{local.classes.tolist()} {local.picks.tolist()}\n"}


def test_episode_set_is_a_pure_function_of_its_arguments(toy):
    one, two = EpisodeSet(toy, 5, 1, 3, 20, seed=4), EpisodeSet(toy, 5, 1, 3, 20, seed=4)
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(one, two))
    assert not np.array_equal(one.classes, EpisodeSet(toy, 5, 1, 3, 20, seed=5).classes)
    batches = list(one.batches(8))
    assert [b.batch_size for b in batches] == [8, 8, 4]
    assert torch.equal(batches[1].unbind()[2].support_x, one[10].support_x)
    assert one.description()["dataset_fingerprint"] == toy.fingerprint()


def test_meta_batch_stacks_episodes(toy):
    batch = EpisodeSampler(toy, 3, 2, 4, seed=0).sample_batch(6)
    assert batch.is_batched and batch.batch_size == 6
    assert batch.support_x.shape == (6, 6, 1, 12, 12) and batch.query_y.shape == (6, 12)
    tasks = batch.unbind()
    assert len(tasks) == 6 and not tasks[0].is_batched
    restacked = Episode.stack(tasks)
    assert torch.equal(restacked.query_x, batch.query_x)


def test_classes_of_different_sizes_are_sampled_within_their_own_examples():
    data = synthetic_dataset(classes=5, per_class=[3, 9, 4, 20, 5])
    classes, picks = draw_indices(data, 5, 3, 200, np.random.default_rng(0))
    counts = data.class_counts[classes]
    assert bool((picks < counts[..., None]).all())
    assert all(len(set(row.tolist())) == 3 for row in picks.reshape(-1, 3))


def test_rotation_classes_are_rotated_copies(toy):
    rotated = toy.with_rotations((0, 90, 180, 270))
    assert rotated.num_classes == 4 * toy.num_classes
    assert rotated.class_names()[5] == "class01/rot090"
    picks = np.arange(4)[None]
    for k in range(4):
        images = rotated.gather(np.array([4 + k]), picks)[0]
        expected = torch.rot90(toy.images[8:12], k, dims=(-2, -1))
        assert torch.equal(images, expected)


@pytest.mark.parametrize("ways,shots,queries,message", [
    (13, 1, 1, "only 12"),
    (5, 6, 3, "need 9 examples"),
    (0, 1, 1, "ways must be"),
    (5, 0, 1, "shots must be"),
])
def test_impossible_requests_give_clear_errors(toy, ways, shots, queries, message):
    with pytest.raises(EpisodeRequestError, match=message):
        EpisodeSampler(toy, ways, shots, queries)


def test_sampler_state_round_trip(toy):
    sampler = EpisodeSampler(toy, 5, 1, 1, seed=3)
    sampler.sample()
    state = sampler.state_dict()
    expected = sampler.sample()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample().support_x, expected.support_x)


def test_subset_and_all_images(toy):
    part = toy.subset([3, 1])
    assert part.base_names == ["class03", "class01"]
    assert torch.equal(part.images[:8], toy.images[24:32])
    images, labels = part.with_rotations((0, 180)).all_images()
    assert images.shape[0] == 32 and labels.tolist()[:9] == [0] * 8 + [1]

