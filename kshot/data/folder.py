"""A user's own images: a folder with one sub-folder of images per class, loaded as a `ClassDataset` whose
input contract says how each file was decoded (and so how a model trained on it must see new files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kshot.data.contract import InputContract, InputError
from kshot.data.dataset import ClassDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
LARGEST_DEFAULT_SIZE = 84
"""A folder of large photos is resized to 84x84 by default, the field's standard for natural images."""


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of `root`, sorted, with a clear error when there are none or one is empty."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give a folder with one sub-folder of images per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root} has no sub-folders; put the images of each class in a sub-folder named after "
                         f"the class")
    for folder in classes:
        if not image_files(folder):
            raise InputError(f"class folder {folder} holds no images (looked for "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes


def infer_contract(files: list[Path], image_size: int | None = None, channels: int | None = None,
                   resize: str = "bilinear", invert: bool = False) -> tuple[InputContract, str]:
    """A contract for a folder of images, with unset fields derived from the files themselves: 1 channel when
    every image is grey, else 3; the median shorter side, capped at 84. Returns it and a sentence saying so."""
    sample = files if len(files) <= 200 else [files[i] for i in np.linspace(0, len(files) - 1, 200).astype(int)]
    modes, sides = set(), []
    for path in sample:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                sides.append(min(image.size))
        except OSError as error:
            raise InputError(f"{path} is not a readable image ({error}); remove it or replace it") from error
    said = []
    if channels is None:
        channels = 1 if modes <= GREY_MODES else 3
        said.append(f"{channels} channel{'s' if channels == 3 else ''} (the images are "
                    f"{'grey' if channels == 1 else 'colour'})")
    if image_size is None:
        median = int(np.median(sides))
        image_size = min(median, LARGEST_DEFAULT_SIZE)
        said.append(f"image_size {image_size} (median shorter side {median}"
                    f"{f', capped at {LARGEST_DEFAULT_SIZE}' if median > LARGEST_DEFAULT_SIZE else ''})")
    contract = InputContract(channels=channels, image_size=image_size, resize=resize, invert=invert)
    return contract, ("derived from the images: " + ", ".join(said)) if said else ""


def image_folder(path: str | Path, image_size: int | None = None, channels: int | None = None,
                 invert: bool = False, resize: str = "bilinear", contract: InputContract | None = None,
                 name: str | None = None) -> ClassDataset:
    """Load `path/<class>/<image>` into a `ClassDataset`; classes are the sub-folder names, sorted.

    Give a model's `contract` (e.g. `model.input_contract`) to decode the files exactly as its training data
    was; otherwise the contract is built from the arguments, with image_size and channels derived from the
    images when unset (see `infer_contract`). `invert` turns dark-on-light drawings into light-on-dark.
    """
    root = Path(path).expanduser()
    classes = class_folders(root)
    files_of = [image_files(folder) for folder in classes]
    if contract is None:
        contract, _ = infer_contract([f for files in files_of for f in files], image_size, channels, resize, invert)
    blocks = [contract.decode(file) for files in files_of for file in files]
    images = torch.from_numpy(np.stack(blocks)).contiguous()
    counts = torch.tensor([len(files) for files in files_of])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return ClassDataset(images, offsets, [folder.name for folder in classes], name=name or root.name,
                        contract=contract)


def load_images(paths: list[str | Path], contract: InputContract) -> torch.Tensor:
    """Image files (for prediction) as uint8 [count, channels, size, size], decoded by `contract`."""
    return contract.decode_files(list(paths))
