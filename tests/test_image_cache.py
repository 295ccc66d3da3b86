"""The memory-mapped image cache: round trip, memory mapping, atomic writing, damaged caches refused."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kshot.data import EpisodeSampler, InputContract
from kshot.data.image_cache import (
    IMAGES_FILE,
    ImageCacheError,
    cache_folder,
    read_image_cache,
    read_index,
    write_image_cache,
)

CONTRACT = InputContract(channels=3, image_size=8, resize="bilinear")
SHAPE = (3, 8, 8)


def make_classes(counts=(5, 3, 7), seed=0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"class{c}", rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)) for c, n in enumerate(counts)]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_round_trip_is_memory_mapped_and_warning_free(tmp_path):
    classes = make_classes()
    folder = tmp_path / "cache" / "train"
    # each class as a generator: the writer must not need more than one pass or a length
    written = write_image_cache(folder, ((name, iter(images)) for name, images in classes), SHAPE, CONTRACT,
                                metadata={"source": "here"}, progress=False)
    assert written == folder and sorted(p.name for p in folder.iterdir()) == ["images.u8", "index.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the read-only array must not make torch warn
        dataset = read_image_cache(folder, "toy", verify=True)
    assert dataset.name == "toy" and dataset.contract == CONTRACT
    assert dataset.base_names == ["class0", "class1", "class2"]
    assert dataset.offsets.tolist() == [0, 5, 8, 15]
    assert torch.equal(dataset.images, torch.from_numpy(np.concatenate([images for _, images in classes])))
    assert read_index(folder)["metadata"] == {"source": "here"}
    if sys.platform.startswith("linux"):
        assert str(folder / IMAGES_FILE) in Path("/proc/self/maps").read_text()


def test_sampling_subset_and_rotations_work_on_the_memory_map(tmp_path):
    classes = make_classes(counts=(6, 6, 6, 6))
    dataset = read_image_cache(write_image_cache(tmp_path / "c", classes, SHAPE, CONTRACT, progress=False), "toy")
    assert torch.equal(dataset.images_at(np.array([2, 0]), np.array([4, 1])),
                       torch.from_numpy(np.stack([classes[2][1][4], classes[0][1][1]])))
    subset = dataset.subset([3, 1])  # copies just those classes' images
    assert subset.base_names == ["class3", "class1"]
    assert torch.equal(subset.images[:6], torch.from_numpy(classes[3][1]))
    rotated = dataset.with_rotations((0, 90))
    assert torch.equal(rotated.images_at(np.array([3]), np.array([2]))[0],
                       torch.from_numpy(classes[1][1][2]).rot90(1, (1, 2)))
    episode = EpisodeSampler(dataset, ways=3, shots=1, queries=2, seed=0).sample()
    assert episode.support_x.shape == (3, *SHAPE) and episode.query_x.shape == (6, *SHAPE)


def test_an_exception_midway_leaves_nothing_behind(tmp_path):
    def failing_images():
        yield np.zeros(SHAPE, np.uint8)
        raise RuntimeError("decoder failed")

    def classes():
        yield "good", make_classes()[0][1]
        yield "bad", failing_images()

    with pytest.raises(RuntimeError, match="decoder failed"):
        write_image_cache(tmp_path / "cache" / "train", classes(), SHAPE, CONTRACT, progress=False)
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("image, message", [
    (np.zeros((3, 8, 9), np.uint8), r"class 'class1', image 0: expected uint8 \(3, 8, 8\)"),
    (np.zeros(SHAPE, np.float32), "got float32"),
])
def test_images_of_the_wrong_shape_or_type_are_refused(tmp_path, image, message):
    classes = [("class0", make_classes()[0][1]), ("class1", [image])]
    with pytest.raises(ImageCacheError, match=message):
        write_image_cache(tmp_path / "cache" / "x", classes, SHAPE, CONTRACT, progress=False)
    assert leftovers(tmp_path / "cache") == []


def test_empty_classes_shape_mismatch_and_existing_folders_are_refused(tmp_path):
    with pytest.raises(ImageCacheError, match="'empty' has no images"):
        write_image_cache(tmp_path / "a", [("empty", [])], SHAPE, CONTRACT, progress=False)
    with pytest.raises(ImageCacheError, match="does not match the contract"):
        write_image_cache(tmp_path / "a", make_classes(), (3, 9, 9), CONTRACT, progress=False)
    folder = write_image_cache(tmp_path / "a", make_classes(), SHAPE, CONTRACT, progress=False)
    with pytest.raises(FileExistsError, match="delete it to rebuild"):
        write_image_cache(folder, make_classes(), SHAPE, CONTRACT, progress=False)


def test_a_writer_that_finished_first_wins(tmp_path):
    """Two processes converting the same cache: the second to finish keeps the first one's complete copy."""
    folder = tmp_path / "cache"

    def classes():
        yield from make_classes(seed=1)
        write_image_cache(folder, make_classes(seed=2), SHAPE, CONTRACT, progress=False)  # the other process

    assert write_image_cache(folder, classes(), SHAPE, CONTRACT, progress=False) == folder
    assert torch.equal(read_image_cache(folder, "x").images[:5], torch.from_numpy(make_classes(seed=2)[0][1]))
    assert leftovers(tmp_path) == ["cache"]


def test_truncated_or_altered_caches_are_refused(tmp_path):
    folder = write_image_cache(tmp_path / "c", make_classes(), SHAPE, CONTRACT, progress=False)
    data = (folder / IMAGES_FILE).read_bytes()
    (folder / IMAGES_FILE).write_bytes(data[:-10])
    with pytest.raises(ImageCacheError, match=r"truncated .* delete the folder .* to rebuild"):
        read_image_cache(folder, "x")
    (folder / IMAGES_FILE).write_bytes(bytes([data[0] ^ 1]) + data[1:])
    read_image_cache(folder, "x")  # same size: only verify=True can tell
    with pytest.raises(ImageCacheError, match="sha256 .* corrupt"):
        read_image_cache(folder, "x", verify=True)
    (folder / "index.json").write_text("{")
    with pytest.raises(ImageCacheError, match="unreadable"):
        read_image_cache(folder, "x")
    with pytest.raises(FileNotFoundError):
        read_image_cache(tmp_path / "absent", "x")


def test_cache_folder_lives_under_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KSHOT_DATA", str(tmp_path / "data"))
    assert cache_folder("tiered-imagenet", "train-84px") == tmp_path / "data" / "tiered-imagenet" / "train-84px"
    assert cache_folder("cub", "test", root=tmp_path / "r") == tmp_path / "r" / "cub" / "test"
