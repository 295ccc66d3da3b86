"""A converted-once, memory-mapped image cache, so that large datasets (tieredImageNet is 16 GB at 84x84) never
have to fit in RAM.

A cache is a folder holding two files:

- `images.u8`: every image as raw uint8 [C, H, W] bytes, class after class (the layout `ClassDataset` wants);
- `index.json`: class names, offsets, image shape, the input contract, free metadata, a format version and the
  sha256 of `images.u8`.

`write_image_cache` streams images into a staging folder beside the target and renames it into place only when
complete, so a crash or an exception never leaves a half-written cache where a reader would find it.
`read_image_cache` maps `images.u8` read-only (`np.memmap`): opening a split costs milliseconds and memory is
only paged in for the images that episodes actually touch.

Working with a memory-mapped dataset:

- episode sampling (`ClassDataset.images_at` / `gather`, one `index_select`) reads only the images it picks;
- `ClassDataset.subset(...)` copies the selected classes' images into RAM (fine for a miniImageNet split, 1.3 GB
  at most; for a huge dataset write one cache per split rather than subsetting one big cache);
- `to(device)`, `all_images()` and `fingerprint()` read the whole file (the fingerprint samples it);
- the images tensor is read-only memory: writing into it in place crashes the process; copy it first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kshot.data.contract import InputContract
from kshot.data.dataset import ClassDataset
from kshot.data.download import file_digest
from kshot.data.paths import data_root
from kshot.progress import progress_bar

FORMAT = "kshot-image-cache"
VERSION = 1
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.json"


class ImageCacheError(ValueError):
    """An image cache that is damaged (truncated, altered, unreadable index) or that cannot be written as asked."""


def cache_folder(dataset: str, variant: str, root: str | Path | None = None) -> Path:
    """Where the cache of `dataset` in `variant` (e.g. "train-84px") lives: `data_root(root)/dataset/variant`
    (the data root is created; the cache folder itself is not)."""
    return data_root(root) / dataset / variant


def write_image_cache(folder: Path, classes: Iterable[tuple[str, Iterable[np.ndarray]]],
                      image_shape: tuple[int, int, int], contract: InputContract, metadata: dict | None = None,
                      progress: bool = True) -> Path:
    """Stream `classes` ((name, images of that class) pairs, each image uint8 [C, H, W] = `image_shape`) into an
    image cache at `folder`, and return `folder`.

    Images are appended to disk one at a time, so the dataset never has to fit in memory. Everything is written
    into a hidden staging folder beside `folder`, which is renamed into place only once complete: any exception
    (a bad image, a failing decoder, Ctrl-C) removes the staging folder and leaves `folder` absent. If another
    process finished the same cache first, its copy is kept and this one is discarded.
    """
    folder = Path(folder)
    image_shape = tuple(int(side) for side in image_shape)  # type: ignore[assignment]
    if len(image_shape) != 3 or tuple(contract.image_shape) != image_shape:
        raise ImageCacheError(f"image_shape {image_shape} does not match the contract ({contract.describe()}, "
                              f"shape {contract.image_shape})")
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; read it with read_image_cache, or delete it to rebuild it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        names, offsets, digest = _write_images(staging / IMAGES_FILE, classes, image_shape, progress, folder.name)
        index = {"format": FORMAT, "version": VERSION, "classes": names, "offsets": offsets,
                 "image_shape": list(image_shape), "contract": contract.to_dict(), "metadata": metadata or {},
                 "sha256": digest}
        with open(staging / INDEX_FILE, "w") as handle:
            json.dump(index, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        staging.chmod(0o755)  # mkdtemp makes it private to this user; a cache is as readable as other data
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / INDEX_FILE).is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once renamed
    return folder


def _write_images(path: Path, classes: Iterable[tuple[str, Iterable[np.ndarray]]], shape: tuple[int, ...],
                  progress: bool, label: str) -> tuple[list[str], list[int], str]:
    """Append every image to `path`; return class names, offsets and the sha256 of the file."""
    names: list[str] = []
    offsets = [0]
    digest = hashlib.sha256()
    total = len(classes) if hasattr(classes, "__len__") else None
    with open(path, "wb") as out:
        for name, images in progress_bar(classes, total=total, desc=f"caching {label}", enabled=progress,
                                         leave=False):
            count = offsets[-1]
            for image in images:
                array = np.ascontiguousarray(image)
                if array.dtype != np.uint8 or array.shape != shape:
                    raise ImageCacheError(f"class {name!r}, image {count - offsets[-1]}: expected uint8 {shape}, "
                                          f"got {array.dtype} {array.shape}")
                data = memoryview(array).cast("B")
                out.write(data)
                digest.update(data)
                count += 1
            if count == offsets[-1]:
                raise ImageCacheError(f"class {name!r} has no images; remove it or add its images")
            names.append(str(name))
            offsets.append(count)
        out.flush()
        os.fsync(out.fileno())
    if not names:
        raise ImageCacheError("no classes given; an image cache needs at least one class of images")
    return names, offsets, digest.hexdigest()


def read_index(folder: Path) -> dict[str, Any]:
    """The checked `index.json` of the cache at `folder` (FileNotFoundError when there is no cache there)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image cache at {folder}")
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ImageCacheError(f"{folder / INDEX_FILE} is missing or unreadable ({error}); delete the folder "
                              f"{folder} to rebuild the cache") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ImageCacheError(f"{folder} is not a version-{VERSION} kshot image cache; delete the folder to rebuild "
                              f"it with this kshot")
    return index


def read_image_cache(folder: Path, name: str, verify: bool = False) -> ClassDataset:
    """The cache at `folder` as a `ClassDataset` named `name`, its images memory-mapped read-only.

    The file size is checked against the index (a truncated or overwritten file is refused with a message
    saying to delete the folder); `verify=True` also recomputes the sha256 of every byte (seconds per GB).
    """
    folder = Path(folder)
    index = read_index(folder)
    path = folder / IMAGES_FILE
    shape = tuple(index["image_shape"])
    offsets = index["offsets"]
    expected = offsets[-1] * int(np.prod(shape))
    found = path.stat().st_size if path.is_file() else 0
    if found != expected:
        state = "truncated" if found < expected else "longer than its index says"
        raise ImageCacheError(f"{path} is {state} ({found:,} bytes, index.json records {expected:,}); delete the "
                              f"folder {folder} to rebuild the cache")
    if verify:
        digest = file_digest(path, "sha256")
        if digest != index["sha256"]:
            raise ImageCacheError(f"{path} has sha256 {digest}, not the {index['sha256']} recorded when it was "
                                  f"written; the file is corrupt: delete the folder {folder} to rebuild the cache")
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(offsets[-1], *shape))
    with warnings.catch_warnings():
        # torch warns that it cannot protect a read-only array from writes; the cache is read-only by design
        # (see the module docstring), and copying it would defeat the memory map.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        images = torch.from_numpy(mapped)
    return ClassDataset(images, torch.tensor(offsets, dtype=torch.long), index["classes"], name=name,
                        contract=InputContract.from_dict(index["contract"], where=f"{folder / INDEX_FILE}: contract"))


