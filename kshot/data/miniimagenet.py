"""miniImageNet (Vinyals et al. 2016) with Ravi & Larochelle's 64 / 16 / 20 class split, read from the formats
users have and converted once per split into a memory-mapped image cache (`kshot.data.image_cache`).

miniImageNet's images have no canonical public download (every copy is resized from ImageNet by someone), so the
user points `source` (or $KSHOT_MINIIMAGENET) at a folder in one of three layouts, tried in this order:

1. image folders: `source/{train,val,test}/<wnid>/*.jpg` (any Pillow-readable image);
2. Ravi & Larochelle's split files: `source/images/<filename>` plus `source/{train,val,test}.csv`
   (`filename,label` rows); a missing CSV is downloaded from their repository and checked by md5;
3. the pickles other libraries distribute: `source/mini-imagenet-cache-{train,val,test}.pkl`, each a dict with
   "image_data" (uint8 [N, 84, 84, 3]) and "class_dict" ({wnid: [indices]}), read without running pickled code.

Every image is decoded by `miniimagenet_contract()` (RGB, 84x84, bilinear resize; images of another size are
resized, with a warning saying so). Classes are sorted by wnid; images keep their file-name, CSV or index order.
"""

from __future__ import annotations

import csv
import os
import pickle
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from kshot.data.contract import RESIZE_FILTERS, InputContract, InputError
from kshot.data.dataset import ClassDataset, check_split_and_size
from kshot.data.download import download as download_file
from kshot.data.download import given_or_env
from kshot.data.folder import class_folders, image_files
from kshot.data.image_cache import cache_folder, read_image_cache, write_image_cache
from kshot.data.paths import data_root
from kshot.data.safe_pickle import UnsafePickleError, safe_load

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
IMAGES_PER_CLASS = 600
SOURCE_ENV = "KSHOT_MINIIMAGENET"
CSV_URL = "https://raw.githubusercontent.com/twitter/meta-learning-lstm/master/data/miniImagenet/{split}.csv"
CSV_MD5 = {"train": "662b6095497b458bc3b418857c4f3030", "val": "b710a1386d5d45d83cd275b81561120e",
           "test": "461c5a120c6d3ab6b18fe4bdbd6bbdb4"}
PICKLE_NAME = "mini-imagenet-cache-{split}.pkl"

RAVI_CLASSES = {split: tuple(wnids.split()) for split, wnids in {
    "train": """n01532829 n01558993 n01704323 n01749939 n01770081 n01843383 n01910747 n02074367 n02089867 n02091831
        n02101006 n02105505 n02108089 n02108551 n02108915 n02111277 n02113712 n02120079 n02165456 n02457408
        n02606052 n02687172 n02747177 n02795169 n02823428 n02966193 n03017168 n03047690 n03062245 n03207743
        n03220513 n03337140 n03347037 n03400231 n03476684 n03527444 n03676483 n03838899 n03854065 n03888605
        n03908618 n03924679 n03998194 n04067472 n04243546 n04251144 n04258138 n04275548 n04296562 n04389033
        n04435653 n04443257 n04509417 n04515003 n04596742 n04604644 n04612504 n06794110 n07584110 n07697537
        n07747607 n09246464 n13054560 n13133613""",
    "val": """n01855672 n02091244 n02114548 n02138441 n02174001 n02950826 n02971356 n02981792 n03075370 n03417042
        n03535780 n03584254 n03770439 n03773504 n03980874 n09256479""",
    "test": """n01930112 n01981276 n02099601 n02110063 n02110341 n02116738 n02129165 n02219486 n02443484 n02871525
        n03127925 n03146219 n03272010 n03544143 n03775546 n04146614 n04149813 n04418357 n04522168 n07613480""",
}.items()}
"""The wnids of each split in Ravi & Larochelle's CSV files (64 / 16 / 20 classes)."""

ClassImages = Iterable[tuple[str, Iterable[np.ndarray]]]


class MiniImageNetError(InputError):
    """miniImageNet data that is missing, of an unknown layout, corrupt, or not the standard split."""


def miniimagenet_contract() -> InputContract:
    """How kshot stores miniImageNet: RGB, 84x84, bilinear resize, not inverted, no normalisation."""
    return InputContract(channels=3, image_size=IMAGE_SIZE, resize="bilinear")


def miniimagenet(split: str = "train", root: str | Path | None = None, source: str | Path | None = None,
                 check: bool = True, download: bool = True, progress: bool = True,
                 verify: bool = False) -> ClassDataset:
    """A miniImageNet split ("train", "val" or "test") as a memory-mapped `ClassDataset`.

    The first call converts the split from `source` (default $KSHOT_MINIIMAGENET; see the module docstring for
    the layouts) into `data_root(root)/miniimagenet/<split>-84px`; later calls only map that cache (`source` is
    then not needed; delete the cache folder to rebuild it from another source). `check` refuses anything but
    Ravi & Larochelle's split (64 / 16 / 20 classes of 600 images), before converting and on every load; pass
    `check=False` for a subset. `download` allows fetching a missing split CSV; `verify` re-hashes the cache.
    """
    check_split_and_size("miniImageNet", split, SPLITS)
    folder = cache_folder("miniimagenet", f"{split}-{IMAGE_SIZE}px", root)
    if not folder.exists():
        convert_split(split, find_source(source), folder, check=check, root=root, download=download,
                      progress=progress)
    dataset = read_image_cache(folder, f"miniimagenet-{split}", verify=verify)
    if check:
        check_classes(split, dataset.base_names, dataset.class_counts.tolist(),
                      f"the cache {folder} (delete it to rebuild it from another source)")
    return dataset


def find_source(source: str | Path | None) -> Path:
    """The folder to convert from: `source`, else $KSHOT_MINIIMAGENET, with a how-to error when neither is set."""
    chosen = given_or_env(source, SOURCE_ENV)
    if chosen is None:
        raise MiniImageNetError(
            f"miniImageNet is not converted yet and no source is given. Its images have no canonical public "
            f"download: point source= (dataset.source in a recipe, or ${SOURCE_ENV}) at a folder holding "
            f"train/ val/ test/ folders of <wnid>/ class folders, or images/ with Ravi & Larochelle's "
            f"train.csv val.csv test.csv, or {PICKLE_NAME.format(split='{train,val,test}')}")
    path = chosen
    if not path.is_dir():
        raise MiniImageNetError(f"miniImageNet source {path} is not a folder")
    return path


def convert_split(split: str, source: Path, folder: Path, check: bool = True, root: str | Path | None = None,
                  download: bool = True, progress: bool = True) -> Path:
    """Convert one split of `source` into the image cache `folder`. The class list is checked before anything
    is decoded, and the cache is written atomically: a corrupt image or pickle leaves nothing behind."""
    contract = miniimagenet_contract()
    kind, counts, images = open_split(source, split, contract, root, download)
    if check:
        check_classes(split, [name for name, _ in counts], [count for _, count in counts], str(source))
    metadata = {"dataset": "miniimagenet", "split": split, "source": str(source.resolve()), "format": kind}
    return write_image_cache(folder, images, contract.image_shape, contract, metadata, progress)


def open_split(source: Path, split: str, contract: InputContract, root: str | Path | None = None,
               download: bool = True) -> tuple[str, list[tuple[str, int]], ClassImages]:
    """The layout found in `source` for `split`, (wnid, image count) per class, and the classes' images, decoded
    lazily as they are iterated."""
    if (source / split).is_dir():
        plan = folder_plan(source / split)
        return "image folders", [(name, len(files)) for name, files in plan], decoded_classes(plan, contract)
    if (source / "images").is_dir():
        plan = csv_plan(source, split, root, download)
        return "split CSV", [(name, len(files)) for name, files in plan], decoded_classes(plan, contract)
    pickled = source / PICKLE_NAME.format(split=split)
    if pickled.is_file():
        array, classes = read_pickle(pickled)
        counts = [(name, len(positions)) for name, positions in classes.items()]
        return "pickle", counts, pickle_images(array, classes, contract)
    raise MiniImageNetError(f"{source} holds neither {split}/ (class folders), images/ (with split CSVs) nor "
                            f"{pickled.name}; see kshot.data.miniimagenet for the layouts")


def check_classes(split: str, names: list[str], counts: list[int], where: str) -> None:
    """Refuse anything but Ravi & Larochelle's `split`: its classes (by wnid), each with 600 images."""
    expected = RAVI_CLASSES[split]
    problems = []
    if len(names) != len(expected):
        problems.append(f"{len(names)} classes, not {len(expected)}")
    uneven = [f"{name} ({count})" for name, count in zip(names, counts) if count != IMAGES_PER_CLASS]
    if uneven:
        problems.append(f"{len(uneven)} classes without {IMAGES_PER_CLASS} images: {', '.join(uneven[:3])}")
    foreign = sorted(set(names) - set(expected))
    if foreign:
        problems.append(f"{len(foreign)} classes outside Ravi & Larochelle's {split} split: {', '.join(foreign[:3])}")
    if problems:
        raise MiniImageNetError(f"miniImageNet {split} split from {where}: {'; '.join(problems)}. The standard "
                                f"split has 64 / 16 / 20 classes of {IMAGES_PER_CLASS} images; fix the data, or "
                                f"pass check=False (dataset.check: false in a recipe) to use a subset or another split")


# ------------------------------------------------------------------------------------------ image files
def folder_plan(split_folder: Path) -> list[tuple[str, list[Path]]]:
    """(wnid, image files) for each class folder of `split_folder`, sorted."""
    return [(folder.name, image_files(folder)) for folder in class_folders(split_folder)]


def split_csv(split: str, root: str | Path | None = None, download: bool = True) -> Path:
    """Ravi & Larochelle's `split`.csv under the data root, downloaded (md5-checked) when missing."""
    target = data_root(root) / "miniimagenet" / "splits" / f"{split}.csv"
    if target.is_file():
        return target
    if not download:
        raise MiniImageNetError(f"{target} not found and download=False; place Ravi & Larochelle's {split}.csv in "
                                f"the source folder or allow the download")
    return download_file(CSV_URL.format(split=split), target, md5=CSV_MD5[split])


def csv_plan(source: Path, split: str, root: str | Path | None, download: bool) -> list[tuple[str, list[Path]]]:
    """(wnid, image files) for each class of a split CSV (`filename,label` rows) over `source/images/`."""
    path = source / f"{split}.csv"
    if not path.is_file():
        path = split_csv(split, root, download)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"] or any(len(r) != 2 for r in rows):
        raise MiniImageNetError(f"{path} is not a split CSV: expected a 'filename,label' header and two columns "
                                f"a row")
    files: dict[str, list[Path]] = {}
    for filename, label in rows[1:]:
        if Path(filename).name != filename:
            raise MiniImageNetError(f"{path}: {filename!r} is not a plain file name inside images/")
        files.setdefault(label, []).append(source / "images" / filename)
    missing = [file for group in files.values() for file in group if not file.is_file()]
    if missing:
        raise MiniImageNetError(f"{len(missing)} images named in {path} are missing from {source / 'images'} "
                                f"(e.g. {missing[0].name}); add them or use a CSV that matches the images")
    return sorted(files.items())


def decoded_classes(plan: list[tuple[str, list[Path]]], contract: InputContract) -> ClassImages:
    """Each class's files decoded by `contract`, in order, a few threads at a time (Pillow decodes without the
    GIL); at most one class's images are held in memory. Warns once if images are resized."""
    side = (contract.image_size, contract.image_size)
    warned = False
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for name, files in plan:
            decoded = list(pool.map(lambda path: _decode(path, contract), files))
            resized = [(path, size) for path, (_, size) in zip(files, decoded) if size != side]
            if resized and not warned:
                warned = True
                path, size = resized[0]
                warnings.warn(f"miniImageNet images are resized to {side[0]}x{side[1]} ({contract.resize}); e.g. "
                              f"{path} is {size[0]}x{size[1]}", stacklevel=1)
            yield name, [image for image, _ in decoded]


def _decode(path: Path, contract: InputContract) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file as uint8 [3, 84, 84] and its original (width, height)."""
    image = contract.decode(path)  # refuses an unreadable or truncated file with an InputError naming it
    with Image.open(path) as header:  # reads the header only
        return image, header.size


# ------------------------------------------------------------------------------------------ pickles
def read_pickle(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A `mini-imagenet-cache-*.pkl`, read without running pickled code and checked: its images (uint8
    [N, H, W, 3]) and the image indices of each class, by sorted wnid. The whole file is read into memory."""
    try:
        data = safe_load(path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise MiniImageNetError(f"{path} is truncated or corrupt ({error}); replace it") from error
    images = data.get("image_data") if isinstance(data, dict) else None
    index = data.get("class_dict") if isinstance(data, dict) else None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
            or not isinstance(index, dict):
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise MiniImageNetError(f"{path} is not a miniImageNet pickle: expected a dict with 'image_data' (uint8 "
                                f"[N, H, W, 3], got {found}) and 'class_dict' ({{wnid: [indices]}})")
    classes = {}
    for wnid, indices in sorted(index.items()):
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(images)):
            raise MiniImageNetError(f"{path}: class {wnid} indexes images outside 0..{len(images) - 1}; the pickle "
                                    f"is corrupt or truncated")
        classes[str(wnid)] = positions
    return images, classes


def pickle_images(images: np.ndarray, classes: dict[str, np.ndarray], contract: InputContract) -> ClassImages:
    """Each class's images from a pickle's [N, H, W, 3] array as uint8 [3, 84, 84], resized (with a warning)
    when the pickle holds another size."""
    side = contract.image_size
    if images.shape[1:3] != (side, side):
        warnings.warn(f"miniImageNet pickle images are {images.shape[2]}x{images.shape[1]}; they are resized to "
                      f"{side}x{side} ({contract.resize})", stacklevel=2)
    for name, positions in classes.items():
        block = images[positions]
        if block.shape[1:3] != (side, side):
            block = np.stack([np.asarray(Image.fromarray(image).resize((side, side), RESIZE_FILTERS[contract.resize]))
                              for image in block])
        yield name, block.transpose(0, 3, 1, 2)
