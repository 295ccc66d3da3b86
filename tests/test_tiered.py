"""tieredImageNet: the three layouts users have (image folders, Ren et al.'s PNG pickle and npz caches with their
labels pickle), built small in tmp_path, streamed into the cache; damaged or unsafe files are refused with
nothing cached."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import files_under
from PIL import Image

from kshot.data import InputContract, InputError, load_dataset
from kshot.data.tiered import TieredImageNetError, tiered_imagenet

# Images of class c (in label order), index i: one colour, RGB = (10 * c, 100 + i, 200).
LABELS = np.array([1, 0, 1, 2, 0, 2, 1], dtype=np.int32)  # the PNG pickle's images need not be grouped
GROUPED = np.sort(LABELS)                                     # Ren et al.'s npz is grouped by class
NAMES = ["house finch", "robin", "jay"]


def _images(labels: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, 84, 84, 3] for `labels`, image i of each class numbered in order of appearance."""
    seen: dict[int, int] = {}
    out = np.empty((len(labels), 84, 84, 3), dtype=np.uint8)
    for k, label in enumerate(labels.tolist()):
        i = seen[label] = seen.get(label, -1) + 1
        out[k] = (10 * label, 100 + i, 200)
    return out


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _labels_pickle(path: Path, labels: np.ndarray, byte_names: bool = False) -> None:
    names = [n.encode() for n in NAMES] if byte_names else NAMES
    table = {"label_specific": labels, "label_general": np.zeros_like(labels),
             "label_specific_str": names, "label_general_str": ["birds"]}
    path.write_bytes(pickle.dumps(table, protocol=2))


def make_png_pickle(folder: Path, split: str = "train") -> Path:
    """`{split}_images_png.pkl` as Ren et al. distribute it: a list of the uint8 arrays cv2.imencode returns
    (the odd entry as plain bytes), with `{split}_labels.pkl`."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [np.frombuffer(_png(image), dtype=np.uint8).reshape(-1, 1) for image in _images(LABELS)]
    entries[3] = entries[3].tobytes()
    (folder / f"{split}_images_png.pkl").write_bytes(pickle.dumps(entries, protocol=4))
    _labels_pickle(folder / f"{split}_labels.pkl", LABELS, byte_names=True)
    return folder


def make_npz(folder: Path, split: str = "train", compressed: bool = False, labels: np.ndarray = GROUPED) -> Path:
    """`{split}_images.npz` as Ren et al.'s decompress writes it (OpenCV's BGR order), with its labels pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    save(folder / f"{split}_images.npz", images=_images(labels)[..., ::-1])
    _labels_pickle(folder / f"{split}_labels.pkl", labels)
    return folder


def make_folder(folder: Path, split: str = "train") -> Path:
    """`{split}/<wnid>/*.jpg`: 3 classes of 2 photos, of other sizes than 84x84."""
    for c, wnid in enumerate(["n01530575", "n01558993", "n01560419"]):
        (folder / split / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (120, 90), (10 * c, 100 + i, 200)).save(folder / split / wnid / f"{wnid}_{i}.JPEG")
    return folder


@pytest.fixture(autouse=True)
def no_source_variable(monkeypatch):
    monkeypatch.delenv("KSHOT_TIERED_IMAGENET", raising=False)


def _colours(data) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in image[:, 40, 40]) for image in data.images]


# ------------------------------------------------------------------------------------------------- layouts
def test_png_pickle_is_grouped_by_class_and_decoded_as_rgb(tmp_path):
    data = tiered_imagenet("train", source=make_png_pickle(tmp_path / "src"), root=tmp_path / "root", check=False,
                           progress=False)
    assert data.base_names == NAMES and data.counts().tolist() == [2, 3, 2]
    assert _colours(data) == [(0, 100, 200), (0, 101, 200), (10, 100, 200), (10, 101, 200), (10, 102, 200),
                              (20, 100, 200), (20, 101, 200)]
    assert data.contract == InputContract(channels=3, image_size=84, resize="bicubic")


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_is_streamed_and_turned_from_bgr_to_rgb(tmp_path, compressed):
    source = make_npz(tmp_path / "src", compressed=compressed)
    data = tiered_imagenet("train", source=source, root=tmp_path / "root", check=False, progress=False)
    assert data.base_names == NAMES and data.counts().tolist() == [2, 3, 2]
    assert _colours(data)[:3] == [(0, 100, 200), (0, 101, 200), (10, 100, 200)]


def test_npz_channel_order_and_resizing(tmp_path):
    source = make_npz(tmp_path / "src")
    data = tiered_imagenet("train", source=source, root=tmp_path / "root", image_size=32, check=False,
                           npz_channel_order="rgb", progress=False)
    assert data.image_shape == (3, 32, 32) and tuple(int(v) for v in data.images[0, :, 5, 5]) == (200, 100, 0)


def test_image_folder_layout(tmp_path):
    data = tiered_imagenet("val", source=make_folder(tmp_path / "src", "val"), root=tmp_path / "root", check=False,
                           progress=False)
    assert data.base_names == ["n01530575", "n01558993", "n01560419"] and data.image_shape == (3, 84, 84)
    assert np.abs(np.array(_colours(data)[2:4]) - [(10, 100, 200), (10, 101, 200)]).max() <= 3  # JPEG


def test_npz_with_scattered_classes_is_refused(tmp_path):
    source = make_npz(tmp_path / "src", labels=LABELS)
    with pytest.raises(TieredImageNetError, match="not stored together"):
        tiered_imagenet("train", source=source, root=tmp_path / "root", check=False, progress=False)
    assert files_under(tmp_path / "root") == []


# ---------------------------------------------------------------------------------------- checks and errors
def test_class_count_check_fires(tmp_path):
    with pytest.raises(TieredImageNetError, match=r"train split has 3 classes, expected 351.*check=False"):
        tiered_imagenet("train", source=make_npz(tmp_path / "src"), root=tmp_path / "root", progress=False)
    assert files_under(tmp_path / "root") == []


def test_no_source_says_there_is_no_download(tmp_path):
    with pytest.raises(TieredImageNetError, match="no canonical download.*KSHOT_TIERED_IMAGENET"):
        tiered_imagenet("test", root=tmp_path / "root", progress=False)
    with pytest.raises(TieredImageNetError, match="holds no tieredImageNet test split"):
        tiered_imagenet("test", source=make_npz(tmp_path / "src"), root=tmp_path / "root", progress=False)


def test_source_from_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("KSHOT_TIERED_IMAGENET", str(make_png_pickle(tmp_path / "src", "test")))
    assert tiered_imagenet("test", root=tmp_path / "root", check=False, progress=False).num_base_classes == 3


@pytest.mark.parametrize("damage", ["truncated npz", "corrupt npz", "truncated pickle", "bad png"])
def test_damaged_files_are_refused_and_nothing_cached(tmp_path, damage):
    source = make_npz(tmp_path / "src") if "npz" in damage else make_png_pickle(tmp_path / "src")
    path = source / ("train_images.npz" if "npz" in damage else "train_images_png.pkl")
    raw = bytearray(path.read_bytes())
    if damage.startswith("truncated"):
        raw = raw[: len(raw) * 2 // 3]
    elif damage == "corrupt npz":
        raw[len(raw) * 2 // 3] ^= 0xFF  # inside the last class: the CRC check at the end catches it
    else:
        entries = pickle.loads(bytes(raw))
        entries[5] = b"\x89PNG not really"
        raw = bytearray(pickle.dumps(entries))
    path.write_bytes(bytes(raw))
    with pytest.raises(TieredImageNetError, match="corrupt|truncated") as error:
        tiered_imagenet("train", source=source, root=tmp_path / "root", check=False, progress=False)
    assert "\n" not in str(error.value)
    assert files_under(tmp_path / "root") == []


def test_labels_pickle_that_runs_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("echo owned",)

    source = make_npz(tmp_path / "src")
    (source / "train_labels.pkl").write_bytes(pickle.dumps({"label_specific": Exploit()}))
    with pytest.raises(TieredImageNetError, match=r"refusing to load (posix|os)\.system"):
        tiered_imagenet("train", source=source, root=tmp_path / "root", check=False, progress=False)


def test_registry_loads_and_refuses_another_contract(tmp_path):
    spec = {"name": "tiered-imagenet", "source": str(make_npz(tmp_path / "src")), "root": str(tmp_path / "root"),
            "check": False}
    assert load_dataset(spec, "train").num_base_classes == 3
    with pytest.raises(InputError, match="set dataset.image_size=28") as error:
        load_dataset(spec, "train", contract=InputContract(channels=3, image_size=28, resize="bicubic"))
    assert "\n" not in str(error.value)
