"""Datasets by name, so recipes, the CLI and benchmarks can ask for "omniglot" or "folder" the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kshot.data.dataset import ClassDataset
from kshot.data.folder import image_folder
from kshot.data.omniglot import omniglot

FOLDER_SPLITS = ("train", "val", "test")


def _folder_split(spec: dict[str, Any], split: str) -> ClassDataset:
    root = Path(spec["path"]).expanduser()
    options = {"image_size": int(spec.get("image_size", 84)), "channels": int(spec.get("channels", 3)),
               "invert": bool(spec.get("invert", False))}
    if (root / split).is_dir():
        return image_folder(root / split, name=f"{root.name}-{split}", **options)
    if split == "all" or not any((root / s).is_dir() for s in FOLDER_SPLITS):
        full = image_folder(root, **options)
        if split == "all":
            return full
        # No split folders: split the classes once, deterministically, by the recipe's fractions.
        fractions = spec.get("class_fractions", {"train": 0.6, "val": 0.2, "test": 0.2})
        if split not in fractions:
            raise ValueError(f"split {split!r} not in class_fractions {fractions}")
        order = torch.randperm(full.num_base_classes, generator=torch.Generator().manual_seed(0)).tolist()
        start = 0
        for name in FOLDER_SPLITS:
            size = round(fractions.get(name, 0.0) * len(order))
            if name == split:
                ids = sorted(order[start:start + size])
                if not ids:
                    raise ValueError(f"{root} has too few classes ({len(order)}) for a {split} split")
                return full.subset(ids, name=f"{root.name}-{split}")
            start += size
    raise FileNotFoundError(f"{root} has split folders but no {split}/; add it or ask for another split")


def load_dataset(spec: dict[str, Any], split: str) -> ClassDataset:
    """The `split` of the dataset described by `spec` ({"name": ..., options}); rotations apply if given."""
    spec = dict(spec)
    name = spec.get("name")
    if name == "omniglot":
        dataset = omniglot(split, root=spec.get("root"), image_size=int(spec.get("image_size", 28)),
                           archives=spec.get("archives"))
    elif name == "folder":
        if "path" not in spec:
            raise ValueError("a folder dataset needs a path: {name: folder, path: /my/images}")
        dataset = _folder_split(spec, split)
    else:
        raise ValueError(f"unknown dataset {name!r}; kshot knows omniglot and folder")
    rotations = spec.get("rotations")
    if rotations is not None:
        dataset = dataset.with_rotations(tuple(rotations))
    return dataset
