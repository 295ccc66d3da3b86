"""tieredImageNet (Ren et al. 2018, "Meta-Learning for Semi-Supervised Few-Shot Classification"): 608 ImageNet
classes grouped in 34 high-level categories, split by category into 351 / 97 / 160 classes (20 / 6 / 8
categories) for train / val / test, 779,165 images at 84x84.

There is no canonical download: the authors publish scripts that build it from ImageNet, and copies circulate in
a few formats. kshot reads a folder (`source=` or $KSHOT_TIERED_IMAGENET) holding, for each split, any one of:

- `{split}_images.npz` + `{split}_labels.pkl`: Ren et al.'s cache (`np.savez(..., images=uint8 [N, 84, 84, 3])`,
  written from OpenCV, so BGR by default: `npz_channel_order`);
- `{split}_images_png.pkl` + `{split}_labels.pkl`: the compressed form they distribute (a pickled list of PNG
  files, as bytes or as the uint8 arrays `cv2.imencode` returns);
- `{split}/<wnid>/*.jpg`: an image folder, one sub-folder per class (photos are resized to image_size, bicubic,
  as Ren et al. did with OpenCV).

`{split}_labels.pkl` is a dict with `label_specific` (class id of each image), `label_specific_str` (class
names), `label_general` and `label_general_str` (categories). Pickles are read with `kshot.data.safe_pickle`
(NumPy arrays and plain containers only), the npz with NumPy's header reader and no pickle at all.

Each split is converted once into a memory-mapped image cache, streamed class by class: the 16 GB of decoded
images never sit in RAM (the PNG list of `{split}_images_png.pkl` does, compressed, because a pickle can only be
read whole). Splits are checked by their class counts (351 / 97 / 160).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field
from pydantic.dataclasses import dataclass

from kshot.config import STRICT
from kshot.data.contract import RESIZE_FILTERS, InputContract, InputError, check_decoded_as
from kshot.data.dataset import ClassDataset, check_split_and_size
from kshot.data.download import given_or_env
from kshot.data.folder import class_folders, image_files
from kshot.data.image_cache import cache_folder, read_image_cache, write_image_cache
from kshot.data.safe_pickle import UnsafePickleError, safe_load

SOURCE_ENV = "KSHOT_TIERED_IMAGENET"
SPLITS = ("train", "val", "test")
SPLIT_CLASSES = {"train": 351, "val": 97, "test": 160}
NATIVE_SIZE = 84
DECODE_THREADS = min(4, os.cpu_count() or 1)
"""Pillow decodes without holding the GIL, so a few threads decode images a few times faster."""
ChannelOrder = Literal["bgr", "rgb"]
Classes = Iterator[tuple[str, list[np.ndarray]]]


class TieredImageNetError(ValueError):
    """tieredImageNet files that are missing, unreadable, of an unknown layout or not tieredImageNet."""


def tiered_contract(image_size: int = NATIVE_SIZE) -> InputContract:
    """tieredImageNet as stored: RGB at image_size (84 natively), bicubic resize as in Ren et al.'s scripts."""
    return InputContract(channels=3, image_size=image_size, resize="bicubic")


def find_source(source: str | Path | None) -> Path:
    """The folder holding a copy of tieredImageNet: `source`, else $KSHOT_TIERED_IMAGENET."""
    given = given_or_env(source, SOURCE_ENV)
    if given is None:
        raise TieredImageNetError(
            f"tieredImageNet has no canonical download (Ren et al. build it from ImageNet with their scripts); "
            f"set dataset.source or {SOURCE_ENV} to a folder holding, for each split, {{split}}_images.npz or "
            f"{{split}}_images_png.pkl with {{split}}_labels.pkl, or a {{split}}/<wnid>/ image folder")
    folder = given
    if not folder.is_dir():
        raise TieredImageNetError(f"{folder} is not a folder; point dataset.source or {SOURCE_ENV} at the folder "
                                  f"holding the tieredImageNet files")
    return folder


def source_format(folder: Path, split: str) -> str:
    """Which layout holds `split` in `folder`: "npz", "png-pkl" or "folder" (in that order of preference)."""
    labels = (folder / f"{split}_labels.pkl").is_file()
    if labels and (folder / f"{split}_images.npz").is_file():
        return "npz"
    if labels and (folder / f"{split}_images_png.pkl").is_file():
        return "png-pkl"
    if (folder / split).is_dir():
        return "folder"
    raise TieredImageNetError(f"{folder} holds no tieredImageNet {split} split: expected {split}_labels.pkl with "
                              f"{split}_images.npz or {split}_images_png.pkl, or a {split}/ image folder")


# ----------------------------------------------------------------------------------------------- the labels
def _field(table: Any, key: str, where: Path) -> Any:
    if isinstance(table, Mapping):
        for candidate in (key, key.encode()):
            if candidate in table:
                return table[candidate]
    raise TieredImageNetError(f"{where} has no {key!r} entry; it is not a tieredImageNet labels file")


def _unpickle(path: Path) -> Any:
    try:
        return safe_load(path)
    except UnsafePickleError as error:
        raise TieredImageNetError(str(error)) from error
    except Exception as error:  # noqa: BLE001 - whatever a damaged pickle raises
        raise TieredImageNetError(f"{path} is not a readable pickle ({error}); it is corrupt or truncated") from error


def read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """Each image's class id and the class names, from `{split}_labels.pkl` (repeated names get their id)."""
    table = _unpickle(path)
    labels = np.asarray(_field(table, "label_specific", path))
    raw = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(table, "label_specific_str", path)]
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and not 0 <= labels.min() <= labels.max()
                                                               < len(raw)):
        raise TieredImageNetError(f"{path}: label_specific must be integer class ids below {len(raw)} (the "
                                  f"number of label_specific_str names)")
    names = [name if raw.count(name) == 1 else f"{name} ({i})" for i, name in enumerate(raw)]
    return labels.astype(np.int64), names


# ------------------------------------------------------------------------------------ the three layouts
def _to_size(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB as uint8 [3, size, size] (bicubic when it must be resized)."""
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), RESIZE_FILTERS["bicubic"]))
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def png_pickle_classes(images: Path, labels: np.ndarray, names: list[str], image_size: int) -> Classes:
    """Classes of `{split}_images_png.pkl`, each decoded (a few threads at a time) only when its turn comes."""
    encoded = _unpickle(images)
    if not isinstance(encoded, list) or len(encoded) != len(labels):
        raise TieredImageNetError(f"{images} holds {type(encoded).__name__} of {len(encoded)} entries, expected a "
                                  f"list of {len(labels)} PNG images (one per label)")
    contract = tiered_contract(image_size)

    def decode(i: int) -> np.ndarray:
        entry = encoded[i]
        try:
            return contract.decode(io.BytesIO(entry.tobytes() if isinstance(entry, np.ndarray) else entry))
        except (InputError, TypeError) as error:
            raise TieredImageNetError(f"{images}: entry {i} is not a readable PNG image; the file is "
                                      f"corrupt") from error

    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(names) + 1))
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for label in range(len(names)):
            if bounds[label + 1] > bounds[label]:
                yield names[label], list(pool.map(decode, order[bounds[label]:bounds[label + 1]]))


def _class_runs(labels: np.ndarray, where: Path) -> list[tuple[int, int]]:
    """(class id, image count) of each run of equal labels; every class must be one run."""
    starts = np.flatnonzero(np.diff(labels, prepend=labels[:1] - 1))
    runs = [(int(labels[s]), int(e - s)) for s, e in zip(starts, np.append(starts[1:], len(labels)))]
    if len({label for label, _ in runs}) != len(runs):
        raise TieredImageNetError(f"{where}: the images of a class are not stored together; kshot streams the npz "
                                  f"in order and needs each class's images in one run, as Ren et al.'s files are")
    return runs


def npz_classes(images: Path, labels: np.ndarray, names: list[str], image_size: int,
                channel_order: ChannelOrder) -> Classes:
    """Classes of `{split}_images.npz`, read row by row from the archive (never the whole array at once)."""
    runs = _class_runs(labels, images)
    try:
        with zipfile.ZipFile(images) as archive, archive.open("images.npy") as handle:
            version = np.lib.format.read_magic(handle)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(handle)
            if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3 or shape[0] != len(labels):
                raise TieredImageNetError(f"{images}: images are {dtype} {shape}, expected uint8 "
                                          f"[{len(labels)}, H, W, 3] (one per label)")
            size = int(np.prod(shape[1:]))
            for label, count in runs:
                batch = np.frombuffer(handle.read(size * count), dtype=np.uint8)
                if batch.size != size * count:
                    raise EOFError("the array ends early")
                batch = batch.reshape(count, *shape[1:])
                batch = batch[..., ::-1] if channel_order == "bgr" else batch
                yield names[label], [_to_size(image, image_size) for image in batch]
            handle.read()  # reading to the end checks the member's CRC
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, ValueError, zlib.error) as error:
        if isinstance(error, TieredImageNetError):
            raise
        raise TieredImageNetError(f"{images} is not a readable npz of images ({error}); it is corrupt or "
                                  f"truncated") from error


def folder_classes(root: Path, image_size: int) -> Classes:
    """Classes of a `{split}/<wnid>/*.jpg` folder, decoded one class at a time (a few threads at once)."""
    contract = tiered_contract(image_size)
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for folder in class_folders(root):
            yield folder.name, list(pool.map(contract.decode, image_files(folder)))


# ------------------------------------------------------------------------------------------------- datasets
def convert(source: Path, split: str, target: Path, image_size: int, check: bool, channel_order: ChannelOrder,
            progress: bool) -> None:
    """Stream one split of `source` into the cache at `target` (atomically), after checking its class count."""
    layout = source_format(source, split)
    if layout == "folder":
        count = len([p for p in (source / split).iterdir() if p.is_dir() and not p.name.startswith(".")])
    else:
        labels, names = read_labels(source / f"{split}_labels.pkl")
        count = len(np.unique(labels))
    if check and count != SPLIT_CLASSES[split]:
        raise TieredImageNetError(f"{source}: the {split} split has {count} classes, expected "
                                  f"{SPLIT_CLASSES[split]}; it is not tieredImageNet or is incomplete (check=False "
                                  f"skips this check)")
    if layout == "folder":
        classes = folder_classes(source / split, image_size)
    elif layout == "png-pkl":
        classes = png_pickle_classes(source / f"{split}_images_png.pkl", labels, names, image_size)
    else:
        classes = npz_classes(source / f"{split}_images.npz", labels, names, image_size, channel_order)
    write_image_cache(target, classes, (3, image_size, image_size), tiered_contract(image_size), progress=progress,
                      metadata={"dataset": "tiered-imagenet", "split": split, "source": str(source),
                                "layout": layout})


def tiered_imagenet(split: str = "train", source: str | Path | None = None, root: str | Path | None = None,
                    image_size: int = NATIVE_SIZE, check: bool = True, npz_channel_order: ChannelOrder = "bgr",
                    progress: bool = True) -> ClassDataset:
    """A tieredImageNet split (351 / 97 / 160 classes) as a memory-mapped `ClassDataset`, converted once from
    `source` (see the module docstring for the layouts read). `check` verifies the split's class count; turn it
    off only for a partial copy, such as a test fixture."""
    check_split_and_size("tieredImageNet", split, SPLITS, image_size)
    folder = cache_folder("tiered-imagenet", f"{split}-{image_size}px", root)
    if not folder.exists():
        convert(find_source(source), split, folder, image_size, check, npz_channel_order, progress)
    dataset = read_image_cache(folder, f"tiered-imagenet-{split}-{image_size}px")
    if check and dataset.num_base_classes != SPLIT_CLASSES[split]:
        raise TieredImageNetError(f"cache {folder} holds {dataset.num_base_classes} classes, expected "
                                  f"{SPLIT_CLASSES[split]}; it was built from a partial copy with check=False: "
                                  f"delete it to rebuild it")
    return dataset


@dataclass(config=STRICT)
class TieredImageNetSpec:
    """tieredImageNet from a local copy (`source`, else $KSHOT_TIERED_IMAGENET; there is no download); `root` is
    where the caches live; images are resized to image_size when it is not 84."""

    name: Literal["tiered-imagenet"] = "tiered-imagenet"
    source: str | None = None
    root: str | None = None
    image_size: Annotated[int, Field(ge=4)] = NATIVE_SIZE
    npz_channel_order: ChannelOrder = "bgr"
    check: bool = True
    rotations: tuple[Annotated[int, Field(multiple_of=90)], ...] | None = None


def load_tiered_spec(spec: dict[str, Any], split: str, contract: InputContract | None) -> ClassDataset:
    """The registry's loader; a model contract other than the cache's is refused in one line."""
    dataset = tiered_imagenet(split, source=spec["source"], root=spec["root"], image_size=spec["image_size"],
                              check=spec["check"], npz_channel_order=spec["npz_channel_order"])
    return check_decoded_as(contract, dataset, f"set dataset.image_size={contract and contract.image_size}")
