"""A user's own images: a folder with one sub-folder of images per class, loaded as a `ClassDataset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kshot.data.dataset import ClassDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 [channels, image_size, image_size] (resized, converted to grey or RGB)."""
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            if converted.size != (image_size, image_size):
                converted = converted.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image ({error}); remove it or replace it") from error
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(path: str | Path, image_size: int = 84, channels: int = 3, invert: bool = False,
                 name: str | None = None) -> ClassDataset:
    """Load `path/<class>/<image>` into a `ClassDataset`; classes are the sub-folder names, sorted.

    `invert` turns dark-on-light drawings (like Omniglot's) into light-on-dark.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give a folder with one sub-folder of images per class")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no sub-folders; put the images of each class in a sub-folder named "
                         f"after the class")
    names, blocks, counts = [], [], []
    for folder in classes:
        files = image_files(folder)
        if not files:
            raise ValueError(f"class folder {folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        names.append(folder.name)
        counts.append(len(files))
        blocks.extend(load_image(file, image_size, channels) for file in files)
    images = torch.from_numpy(np.stack(blocks))
    if invert:
        images = 255 - images
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)])
    return ClassDataset(images.contiguous(), offsets, names, name=name or root.name)


def load_images(paths: list[Path], image_size: int, channels: int, invert: bool = False) -> torch.Tensor:
    """Images given as files (for prediction) as uint8 [count, channels, size, size]."""
    if not paths:
        raise ValueError("no images given")
    images = torch.from_numpy(np.stack([load_image(Path(p), image_size, channels) for p in paths]))
    return 255 - images if invert else images
