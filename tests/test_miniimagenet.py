"""miniImageNet from its three layouts (image folders, split CSVs, pickles) on small fixtures built here, the
content checks, the cache written once, and pickles that try to run code refused."""

from __future__ import annotations

import builtins
import csv
import importlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kshot import cli as kshot_cli
from kshot.config import ConfigError
from kshot.data import InputContract, InputError, load_dataset
from kshot.data.image_cache import ImageCacheError
from kshot.data.miniimagenet import (
    CSV_MD5,
    RAVI_CLASSES,
    SOURCE_ENV,
    MiniImageNetError,
    miniimagenet,
    miniimagenet_contract,
)
from kshot.data.safe_pickle import UnsafePickleError, safe_loads

# the module itself (kshot.data.miniimagenet is the loader function, re-exported by kshot.data)
module = importlib.import_module("kshot.data.miniimagenet")

CLASSES = {"train": 3, "val": 2, "test": 2}
PER_CLASS = 6


@pytest.fixture(autouse=True)
def no_source_env(monkeypatch):
    monkeypatch.delenv(SOURCE_ENV, raising=False)


def fixture_images(split: str, size: int = 84) -> dict[str, np.ndarray]:
    """Real wnids of `split`, each with PER_CLASS random RGB images [H, W, 3]."""
    rng = np.random.default_rng(len(split))
    return {wnid: rng.integers(0, 256, (PER_CLASS, size, size, 3), dtype=np.uint8)
            for wnid in RAVI_CLASSES[split][:CLASSES[split]]}


def expected(split: str) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(list(fixture_images(split).values())).transpose(0, 3, 1, 2))


def file_name(wnid: str, index: int, suffix: str = ".png") -> str:
    return f"{wnid}{index:08d}{suffix}"


def folder_layout(root: Path, size: int = 84, suffix: str = ".png") -> Path:
    for split in CLASSES:
        for wnid, images in fixture_images(split, size).items():
            (root / split / wnid).mkdir(parents=True)
            for index, image in enumerate(images):
                Image.fromarray(image).save(root / split / wnid / file_name(wnid, index, suffix))
    return root


def csv_layout(root: Path, with_csv: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    for split in CLASSES:
        rows = [("filename", "label")]
        for wnid, images in fixture_images(split).items():
            for index, image in enumerate(images):
                Image.fromarray(image).save(root / "images" / file_name(wnid, index))
                rows.append((file_name(wnid, index), wnid))
        if with_csv:
            with open(root / f"{split}.csv", "w", newline="") as handle:
                csv.writer(handle).writerows(rows)
    return root


def pickle_layout(root: Path) -> Path:
    """The structure other libraries distribute: image_data [N, 84, 84, 3], class_dict {wnid: [indices]}."""
    root.mkdir(parents=True)
    for split in CLASSES:
        images = fixture_images(split)
        data = np.concatenate(list(images.values()))
        class_dict = {wnid: list(range(c * PER_CLASS, (c + 1) * PER_CLASS)) for c, wnid in enumerate(images)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump({"image_data": data, "class_dict": class_dict}, handle, protocol=4)
    return root


def written(root: Path) -> list[str]:
    """What the loader left under its cache folder (staging folders included)."""
    folder = root / "miniimagenet"
    return sorted(os.listdir(folder)) if folder.exists() else []


LAYOUTS = {"folders": folder_layout, "csv": csv_layout, "pickle": pickle_layout}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_converts_every_split_to_the_same_images(tmp_path, layout):
    source = LAYOUTS[layout](tmp_path / "source")
    for split in CLASSES:
        dataset = miniimagenet(split, root=tmp_path / "cache", source=source, check=False, progress=False)
        assert dataset.name == f"miniimagenet-{split}" and dataset.contract == miniimagenet_contract()
        assert dataset.base_names == sorted(RAVI_CLASSES[split][:CLASSES[split]])
        assert dataset.counts().tolist() == [PER_CLASS] * CLASSES[split]
        assert torch.equal(dataset.images, expected(split))
    assert (tmp_path / "cache" / "miniimagenet" / "train-84px" / "images.u8").is_file()


def test_other_sizes_are_resized_with_a_warning(tmp_path):
    source = folder_layout(tmp_path / "source", size=60, suffix=".jpg")
    with pytest.warns(UserWarning, match=r"resized to 84x84 \(bilinear\); e.g. .*\.jpg is 60x60"):
        dataset = miniimagenet("val", root=tmp_path / "cache", source=source, check=False, progress=False)
    assert dataset.image_shape == (3, 84, 84)


def test_the_standard_split_is_checked_before_converting(tmp_path):
    source = folder_layout(tmp_path / "source")
    with pytest.raises(MiniImageNetError, match=r"train split from .*: 3 classes, not 64; 3 classes without 600 "
                                                r"images: n01532829 \(6\).*pass check=False"):
        miniimagenet("train", root=tmp_path / "cache", source=source, progress=False)
    assert not (tmp_path / "cache" / "miniimagenet" / "train-84px").exists()
    (source / "val" / "n99999999").mkdir()
    Image.new("RGB", (84, 84)).save(source / "val" / "n99999999" / "a.png")
    with pytest.raises(MiniImageNetError, match="1 classes outside Ravi & Larochelle's val split: n99999999"):
        miniimagenet("val", root=tmp_path / "cache", source=source, progress=False)
    # a subset cached with check=False is refused by a later checked load, which says how to rebuild
    miniimagenet("test", root=tmp_path / "cache", source=source, check=False, progress=False)
    with pytest.raises(MiniImageNetError, match=r"the cache .*test-84px \(delete it to rebuild .*\): 2 classes, "):
        miniimagenet("test", root=tmp_path / "cache", progress=False)


def test_the_cache_is_written_once_and_reused_without_decoding(tmp_path, monkeypatch):
    source = folder_layout(tmp_path / "source")
    first = miniimagenet("val", root=tmp_path / "cache", source=source, check=False, progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(module, "_decode", no_decoding)
    monkeypatch.setattr(module, "safe_load", no_decoding)
    again = miniimagenet("val", root=tmp_path / "cache", check=False, progress=False)  # no source needed now
    assert torch.equal(again.images, first.images)


def test_a_failure_midway_leaves_nothing_half_written(tmp_path, monkeypatch):
    source = folder_layout(tmp_path / "source")
    decode = module._decode
    victim = sorted((source / "train").glob("*/*.png"))[PER_CLASS + 1]  # in the second class

    def failing(path, contract):
        if path == victim:
            raise InputError(f"{path} is not a readable image")
        return decode(path, contract)

    monkeypatch.setattr(module, "_decode", failing)
    with pytest.raises(InputError, match="not a readable image"):
        miniimagenet("train", root=tmp_path / "cache", source=source, check=False, progress=False)
    assert written(tmp_path / "cache") == []
    monkeypatch.setattr(module, "_decode", decode)
    assert len(miniimagenet("train", root=tmp_path / "cache", source=source, check=False, progress=False)) == 18


def test_corrupt_inputs_are_refused_with_nothing_written(tmp_path):
    source = folder_layout(tmp_path / "source", suffix=".jpg")
    victim = next((source / "val").glob("*/*.jpg"))
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(InputError, match=f"{victim.name} is not a readable image"):
        miniimagenet("val", root=tmp_path / "cache", source=source, check=False, progress=False)
    pickles = pickle_layout(tmp_path / "pickles")
    cut = pickles / "mini-imagenet-cache-test.pkl"
    cut.write_bytes(cut.read_bytes()[:5000])
    with pytest.raises(MiniImageNetError, match="truncated or corrupt"):
        miniimagenet("test", root=tmp_path / "cache", source=pickles, check=False, progress=False)
    with open(pickles / "mini-imagenet-cache-train.pkl", "wb") as handle:
        pickle.dump({"image_data": np.zeros((4, 84, 84), np.uint8), "class_dict": {}}, handle)
    with pytest.raises(MiniImageNetError, match=r"not a miniImageNet pickle.*got uint8 \(4, 84, 84\)"):
        miniimagenet("train", root=tmp_path / "cache", source=pickles, check=False, progress=False)
    assert written(tmp_path / "cache") == []


def test_a_truncated_cache_is_refused(tmp_path):
    source = pickle_layout(tmp_path / "source")
    miniimagenet("val", root=tmp_path / "cache", source=source, check=False, progress=False)
    images = tmp_path / "cache" / "miniimagenet" / "val-84px" / "images.u8"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(ImageCacheError, match="truncated .* delete the folder"):
        miniimagenet("val", root=tmp_path / "cache", source=source, check=False, progress=False)


class RunsCode:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("attack", ["system", "exec"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, attack):
    marker = tmp_path / "pwned"
    payload = RunsCode(os.system, f"touch {marker}") if attack == "system" else \
        RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    source = tmp_path / "source"
    source.mkdir()
    data = {"image_data": np.zeros((6, 84, 84, 3), np.uint8), "class_dict": {"n01532829": payload}}
    (source / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafePickleError, match=r"refusing to load (posix\.system|builtins\.exec)"):
        miniimagenet("train", root=tmp_path / "cache", source=source, check=False, progress=False)
    assert not marker.exists()
    assert written(tmp_path / "cache") == []


def test_safe_pickles_read_numpy_and_containers_of_every_protocol():
    value = {"a": np.arange(12, dtype=np.uint8).reshape(3, 4), "f": np.ones((2, 3), np.float32, order="F"),
             "scalar": np.int64(7), "dtype": np.dtype("u2"), "items": [1, (2.5, "x"), {3}], "raw": b"\x00\xff"}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = safe_loads(pickle.dumps(value, protocol=protocol))
        assert np.array_equal(loaded["a"], value["a"]) and loaded["f"].flags.f_contiguous
        assert loaded["scalar"] == 7 and loaded["dtype"] == np.dtype("u2")
        assert loaded["items"] == value["items"] and loaded["raw"] == value["raw"]
    # NumPy 1.x writes numpy.core.multiarray: still readable under NumPy 2
    old = pickle.dumps(value["a"], protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert np.array_equal(safe_loads(old), value["a"])
    with pytest.raises(UnsafePickleError, match="refusing to load collections.Counter"):
        safe_loads(pickle.dumps(__import__("collections").Counter("ab")))


def test_split_csvs_come_from_the_source_or_a_checked_download(tmp_path, monkeypatch):
    source = csv_layout(tmp_path / "source", with_csv=False)
    fetched = []

    def fake_download(url, target, md5):
        fetched.append((url, md5))
        target.parent.mkdir(parents=True, exist_ok=True)
        rows = ["filename,label"] + [f"{file_name(w, i)},{w}" for w in fixture_images("val") for i in range(6)]
        target.write_text("\n".join(rows) + "\n")
        return target

    monkeypatch.setattr(module, "download_file", fake_download)
    dataset = miniimagenet("val", root=tmp_path / "cache", source=source, check=False, progress=False)
    assert torch.equal(dataset.images, expected("val"))
    assert fetched == [("https://raw.githubusercontent.com/twitter/meta-learning-lstm/master/data/miniImagenet/"
                        "val.csv", CSV_MD5["val"])]
    assert (tmp_path / "cache" / "miniimagenet" / "splits" / "val.csv").is_file()
    with pytest.raises(MiniImageNetError, match="download=False"):
        miniimagenet("test", root=tmp_path / "cache", source=source, check=False, download=False)
    next((source / "images").glob("n01930112*")).unlink()
    (source / "test.csv").write_text("filename,label\n" + "".join(
        f"{file_name(w, i)},{w}\n" for w in fixture_images("test") for i in range(6)))
    with pytest.raises(MiniImageNetError, match="1 images named in .*test.csv are missing from"):
        miniimagenet("test", root=tmp_path / "cache", source=source, check=False)


def test_sources_come_from_the_environment_with_a_how_to_when_missing(tmp_path, monkeypatch):
    with pytest.raises(MiniImageNetError, match=f"no canonical public download.*{SOURCE_ENV}"):
        miniimagenet("val", root=tmp_path / "cache")
    with pytest.raises(MiniImageNetError, match="holds neither val/"):
        miniimagenet("val", root=tmp_path / "cache", source=tmp_path)
    monkeypatch.setenv(SOURCE_ENV, str(folder_layout(tmp_path / "source")))
    assert miniimagenet("val", root=tmp_path / "cache", check=False, progress=False).num_classes == 2


def test_the_registry_loads_it_and_refuses_another_contract(tmp_path):
    spec = {"name": "miniimagenet", "source": str(pickle_layout(tmp_path / "source")),
            "root": str(tmp_path / "cache"), "check": False, "rotations": [0, 180]}
    train = load_dataset(spec, "train", augment=True)
    assert train.num_classes == 6 and train.contract == miniimagenet_contract()
    with pytest.raises(InputError, match=r"image_size=84 \(the model expects 32\)"):
        load_dataset(spec, "test", contract=InputContract(channels=3, image_size=32))
    with pytest.raises(ConfigError, match="not a miniImageNet split"):
        load_dataset(spec, "trainval")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_dataset({**spec, "image_size": 32}, "train")


def test_kshot_download_converts_every_split_or_says_what_is_wrong(tmp_path, monkeypatch, capsys):
    source = folder_layout(tmp_path / "source")
    monkeypatch.setattr(sys, "argv", ["kshot", "download", "miniimagenet", "--archives", str(source),
                                      "--data-root", str(tmp_path / "cache")])
    with pytest.raises(SystemExit) as exited:
        kshot_cli.main()
    assert exited.value.code == 2
    assert "error: miniImageNet train split from" in capsys.readouterr().err
