"""CIFAR-FS and FC100: the stated splits, and the archive -> cache path on small archives built in the real
CIFAR-100 python format (a tar.gz of pickled dicts), including corrupt, truncated, unsafe and wrong archives."""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import files_under, serve_folder

from kshot.data import InputContract, InputError, load_dataset
from kshot.data.cifar import CIFAR_FS_CLASSES, FC100_SUPERCLASSES, CifarError, cifar_fs, fc100
from kshot.data.download import DownloadError

cifar_module = importlib.import_module("kshot.data.cifar")

# CIFAR-100's superclasses and their classes, as listed on the dataset's page (labels are alphabetical).
SUPERCLASSES = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
COARSE = sorted(SUPERCLASSES)
FINE = sorted(name for names in SUPERCLASSES.values() for name in names.split())
COARSE_OF = {name: COARSE.index(s) for s, names in SUPERCLASSES.items() for name in names.split()}


def _part(per_class: dict[str, int], first: int) -> dict[bytes, object]:
    """One CIFAR pickle: image i of class c has red = fine label, green = first + i, blue = 7."""
    rows, fine, coarse = [], [], []
    for name, count in per_class.items():
        for i in range(count):
            image = np.empty((3, 32, 32), dtype=np.uint8)
            image[0], image[1], image[2] = FINE.index(name), first + i, 7
            rows.append(image.reshape(-1))  # CIFAR rows: 1024 red, then 1024 green, then 1024 blue values
            fine.append(FINE.index(name))
            coarse.append(COARSE_OF[name])
    data = np.stack(rows) if rows else np.zeros((0, 3072), dtype=np.uint8)
    return {b"batch_label": b"fixture", b"filenames": [b"x.png"] * len(rows), b"fine_labels": fine,
            b"coarse_labels": coarse, b"data": data}


def make_archive(path: Path, train: dict[str, int], test: dict[str, int], meta: object = None,
                 str_keys: bool = False) -> Path:
    """A cifar-100-python.tar.gz with the real members: train, test and meta pickles (protocol 2). Keys are bytes
    (as Python 3 reads the real Python 2 pickles with encoding="bytes"), or str (as read with "latin1")."""
    meta = meta if meta is not None else {b"fine_label_names": [n.encode() for n in FINE],
                                          b"coarse_label_names": [n.encode() for n in COARSE]}
    members = {"train": _part(train, 0), "test": _part(test, 100), "meta": meta}
    if str_keys:
        members = {name: {k.decode(): v for k, v in table.items()} for name, table in members.items()}
    with tarfile.open(path, "w:gz") as tar:
        for name, table in members.items():
            data = pickle.dumps(table, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


SOME = {"apple": 3, "bear": 2, "beaver": 2, "baby": 2, "whale": 1, "bed": 1}  # train, val and test classes


@pytest.fixture
def small(tmp_path, monkeypatch):
    monkeypatch.delenv("KSHOT_CIFAR100_ARCHIVE", raising=False)
    return make_archive(tmp_path / "cifar-100-python.tar.gz", SOME, {"apple": 1, "baby": 1})


@pytest.fixture
def complete(tmp_path, monkeypatch):
    """Every class, 5 training and 1 test image each, with the expected counts shrunk to match."""
    monkeypatch.setattr(cifar_module, "IMAGES_PER_CLASS", 6)
    monkeypatch.setattr(cifar_module, "CIFAR_IMAGES", {"train": 500, "test": 100})
    return make_archive(tmp_path / "full.tar.gz", dict.fromkeys(FINE, 5), dict.fromkeys(FINE, 1), str_keys=True)


# ------------------------------------------------------------------------------------------------- the splits
def test_stated_splits_partition_cifar100():
    fs = [set(CIFAR_FS_CLASSES[s]) for s in ("train", "val", "test")]
    assert [len(s) for s in fs] == [64, 16, 20] and set.union(*fs) == set(FINE)
    fc = [set(FC100_SUPERCLASSES[s]) for s in ("train", "val", "test")]
    assert [len(s) for s in fc] == [12, 4, 4] and set.union(*fc) == set(COARSE)


def test_complete_archive_gives_the_standard_splits(complete, tmp_path):
    root = tmp_path / "root"
    for split, size in (("train", 64), ("val", 16), ("test", 20)):
        data = cifar_fs(split, root=root, archive=complete, progress=False)
        assert data.base_names == sorted(CIFAR_FS_CLASSES[split]) and data.num_base_classes == size
        assert (data.counts() == 6).all() and data.image_shape == (3, 32, 32)
    for split, size in (("train", 60), ("val", 20), ("test", 20)):
        data = fc100(split, root=root, archive=complete, progress=False)
        assert data.num_base_classes == size
        assert {COARSE[COARSE_OF[name]] for name in data.base_names} == set(FC100_SUPERCLASSES[split])
    assert sorted(p.name for p in (root / "fc100").iterdir()) == ["test-32px", "train-32px", "val-32px"]


def test_images_keep_channels_and_train_then_test_order(small, tmp_path):
    data = cifar_fs("train", root=tmp_path / "root", archive=small, check=False, progress=False)
    assert data.base_names == ["apple", "bear"]  # train classes with images; the others are absent
    apple = data.images[0:4].numpy()
    assert (apple[:, 0] == FINE.index("apple")).all() and (apple[:, 2] == 7).all()
    assert apple[:, 1, 0, 0].tolist() == [0, 1, 2, 100]  # 3 CIFAR training images, then the test image
    assert data.contract == InputContract(channels=3, image_size=32)


def test_content_check_fires_on_a_partial_archive(small, tmp_path):
    with pytest.raises(CifarError, match=r"expected 100, 20 .*check=False skips this check"):
        fc100("train", root=tmp_path / "root", archive=small, progress=False)
    assert files_under(tmp_path / "root") == []


def test_check_on_read_refuses_a_cache_built_without_it(small, tmp_path):
    cifar_fs("test", root=tmp_path / "root", archive=small, check=False, progress=False)
    with pytest.raises(CifarError, match="expected 20 of 600"):
        cifar_fs("test", root=tmp_path / "root", check=True, progress=False)


# ---------------------------------------------------------------------------------------- broken archives
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_archive_is_refused_and_nothing_cached(small, tmp_path, damage):
    raw = bytearray(small.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) * 2 // 3]
    else:
        raw[len(raw) // 2] ^= 0xFF
    small.write_bytes(bytes(raw))
    with pytest.raises(CifarError, match="corrupt or truncated") as error:
        cifar_fs("train", root=tmp_path / "root", archive=small, check=False, progress=False)
    assert "\n" not in str(error.value)
    assert files_under(tmp_path / "root") == []


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("echo owned",)

    archive = make_archive(tmp_path / "evil.tar.gz", SOME, {"apple": 1}, meta=Exploit())
    with pytest.raises(CifarError, match=r"meta: .*refusing to load (posix|os)\.system"):
        cifar_fs("train", root=tmp_path / "root", archive=archive, check=False, progress=False)
    assert files_under(tmp_path / "root") == []


def test_archive_without_the_cifar_members_is_refused(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("something/else")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(CifarError, match="not the CIFAR-100 python archive"):
        cifar_fs("train", root=tmp_path / "root", archive=path, check=False, progress=False)


# ----------------------------------------------------------------------------------- where the archive is
def test_archive_from_environment_variable(small, tmp_path, monkeypatch):
    monkeypatch.setenv("KSHOT_CIFAR100_ARCHIVE", str(small))
    assert fc100("test", root=tmp_path / "root", check=False, progress=False).base_names == ["baby", "beaver", "whale"]


def test_missing_archive_without_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("KSHOT_CIFAR100_ARCHIVE", raising=False)
    with pytest.raises(CifarError, match="KSHOT_CIFAR100_ARCHIVE"):
        cifar_fs("train", root=tmp_path / "root", download=False, progress=False)


@pytest.fixture
def server(small):
    with serve_folder(small.parent) as url:
        yield f"{url}/{small.name}"


def test_download_is_checked_by_md5(small, server, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_module, "ARCHIVE_URL", server)
    monkeypatch.setattr(cifar_module, "ARCHIVE_MD5", "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="does not match"):
        cifar_fs("train", root=root, check=False, progress=False)
    assert files_under(root) == []
    monkeypatch.setattr(cifar_module, "ARCHIVE_MD5", hashlib.md5(small.read_bytes()).hexdigest())
    assert cifar_fs("train", root=root, check=False, progress=False).num_base_classes == 2
    assert (root / "cifar-100" / "cifar-100-python.tar.gz").read_bytes() == small.read_bytes()


# ---------------------------------------------------------------------------------------------- the registry
def test_registry_loads_and_refuses_another_contract(small, tmp_path):
    spec = {"name": "cifar-fs", "archive": str(small), "root": str(tmp_path / "root"), "check": False}
    assert load_dataset(spec, "val").base_names == ["beaver"]
    with pytest.raises(InputError, match="the model expects") as error:
        load_dataset(spec, "val", contract=InputContract(channels=3, image_size=84))
    assert "\n" not in str(error.value)


def test_split_without_any_class_in_a_partial_archive_is_a_clear_error(tmp_path):
    archive = make_archive(tmp_path / "a.tar.gz", {"apple": 1}, {"apple": 1})
    with pytest.raises(CifarError, match="no image of a cifar-fs val class"):
        cifar_fs("val", root=tmp_path / "root", archive=archive, check=False, progress=False)
    assert cifar_fs("train", root=tmp_path / "root", archive=archive, check=False, progress=False).base_names == \
        ["apple"]
