"""CUB-200-2011: Chen et al.'s split rule, and the archive -> cache path on a small CUB_200_2011.tgz built in the
real layout, including corrupt and truncated archives and the md5-checked download."""

from __future__ import annotations

import hashlib
import importlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import files_under, serve_folder
from PIL import Image

from kshot.data import InputContract, InputError, load_dataset
from kshot.data.cub import CubError, chen_split, cub
from kshot.data.download import DownloadError

cub_module = importlib.import_module("kshot.data.cub")
CLASSES = [f"{i:03d}.Bird_{i}" for i in range(1, 9)]  # 8 classes: 4 train, 2 val, 2 test


def _jpeg(value: int, size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    colour = value if mode == "L" else (value, 255 - value, 40)
    Image.new(mode, size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_archive(path: Path, classes: list[str] = CLASSES, photos: int = 2) -> Path:
    """A CUB_200_2011.tgz laid out like the real one (plus a few of its other files, which are ignored)."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("attributes.txt", b"1 has_bill_shape::curved\n")
        add("CUB_200_2011/classes.txt", "".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)).encode())
        for c, name in enumerate(classes):
            for p in reversed(range(photos)):  # stored out of order: kshot sorts photos by file name
                grey = c == 1 and p == 0
                add(f"CUB_200_2011/images/{name}/{name[4:]}_{p:04d}.jpg",
                    _jpeg(20 * c + 100 * p, (60, 45) if p else (30, 50), "L" if grey else "RGB"))
    return path


@pytest.fixture
def small(tmp_path, monkeypatch):
    monkeypatch.delenv("KSHOT_CUB_ARCHIVE", raising=False)
    return make_archive(tmp_path / "CUB_200_2011.tgz")


def test_chen_split_rule_gives_100_50_50():
    names = [f"{i:03d}.Species" for i in range(200, 0, -1)]
    split = chen_split(names)
    assert [len(split[s]) for s in ("train", "val", "test")] == [100, 50, 50]
    assert split["train"][:2] == ["001.Species", "003.Species"]
    assert split["val"][:2] == ["002.Species", "006.Species"]
    assert split["test"][:2] == ["004.Species", "008.Species"]


def test_archive_converts_every_split_once(small, tmp_path):
    root = tmp_path / "root"
    train = cub("train", root=root, image_size=16, archive=small, check=False, progress=False)
    assert train.base_names == CLASSES[0::2] and train.image_shape == (3, 16, 16) and (train.counts() == 2).all()
    assert train.contract == InputContract(channels=3, image_size=16, resize="bilinear")
    first = train.images[0].numpy().astype(int)  # photo 0000 of class 001: colour (0, 255, 40)
    assert abs(first[0].mean() - 0) < 6 and abs(first[1].mean() - 255) < 6 and abs(first[2].mean() - 40) < 6
    small.unlink()  # val and test were cached in the same pass
    val = cub("val", root=root, image_size=16, check=False, progress=False)
    test = cub("test", root=root, image_size=16, check=False, progress=False)
    assert val.base_names == [CLASSES[1], CLASSES[5]] and test.base_names == [CLASSES[3], CLASSES[7]]
    grey = val.images[0].numpy()  # a grey photo, stored as RGB with three equal channels
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


def test_content_check_fires_on_a_partial_archive(small, tmp_path):
    with pytest.raises(CubError, match=r"holds 8 classes and 16 photos .* expected 200 and 11788.*check=False"):
        cub("train", root=tmp_path / "root", archive=small, progress=False)
    assert files_under(tmp_path / "root") == []


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_archive_is_refused_and_nothing_cached(small, tmp_path, damage):
    raw = bytearray(small.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) - 200]
    else:
        raw[len(raw) // 2] ^= 0xFF
    small.write_bytes(bytes(raw))
    with pytest.raises(CubError, match="corrupt") as error:
        cub("train", root=tmp_path / "root", archive=small, check=False, progress=False)
    assert "\n" not in str(error.value)
    assert files_under(tmp_path / "root") == []


def test_unreadable_photo_in_a_sound_archive_is_refused(tmp_path):
    path = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("CUB_200_2011/images/001.Bird/photo.jpg")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"not a jpeg"))
    with pytest.raises(CubError, match="photo.jpg is not a readable image"):
        cub("train", root=tmp_path / "root", archive=path, check=False, progress=False)
    assert files_under(tmp_path / "root") == []


def test_archive_from_environment_variable_and_missing_archive(small, tmp_path, monkeypatch):
    with pytest.raises(CubError, match="KSHOT_CUB_ARCHIVE"):
        cub("train", root=tmp_path / "root", download=False, progress=False)
    monkeypatch.setenv("KSHOT_CUB_ARCHIVE", str(small))
    assert cub("test", root=tmp_path / "root", image_size=8, check=False, progress=False).num_base_classes == 2


@pytest.fixture
def server(small):
    with serve_folder(small.parent) as url:
        yield f"{url}/{small.name}"


def test_download_is_checked_by_md5(small, server, tmp_path, monkeypatch):
    monkeypatch.setattr(cub_module, "ARCHIVE_URL", server)
    monkeypatch.setattr(cub_module, "ARCHIVE_MD5", "f" * 32)
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="does not match"):
        cub("train", root=root, image_size=8, check=False, progress=False)
    assert files_under(root) == []
    monkeypatch.setattr(cub_module, "ARCHIVE_MD5", hashlib.md5(small.read_bytes()).hexdigest())
    assert cub("train", root=root, image_size=8, check=False, progress=False).num_base_classes == 4
    assert (root / "cub" / "CUB_200_2011.tgz").read_bytes() == small.read_bytes()


def test_registry_loads_and_refuses_another_contract(small, tmp_path):
    spec = {"name": "cub", "archive": str(small), "root": str(tmp_path / "root"), "check": False, "image_size": 12}
    assert load_dataset(spec, "val").image_shape == (3, 12, 12)
    with pytest.raises(InputError, match=r"the model expects .* set dataset.image_size=84") as error:
        load_dataset(spec, "val", contract=InputContract(channels=3, image_size=84))
    assert "\n" not in str(error.value)
