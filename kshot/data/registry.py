"""Datasets by name, so recipes, the CLI and benchmarks can ask for "omniglot" or "folder" the same way; each
kind of dataset has a typed spec (its recipe section), checked before anything loads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass

from kshot.config import STRICT, ConfigError, Fraction, PositiveInt, as_dict, parse
from kshot.data.cifar import CifarFSSpec, FC100Spec, load_cifar_spec
from kshot.data.contract import InputContract, InputError, ResizeFilter, check_decoded_as
from kshot.data.cub import CubSpec, load_cub_spec
from kshot.data.dataset import ClassDataset
from kshot.data.folder import class_folders, image_files, image_folder, infer_contract
from kshot.data.miniimagenet import SPLITS as MINIIMAGENET_SPLITS
from kshot.data.miniimagenet import miniimagenet
from kshot.data.omniglot import SPLITS as OMNIGLOT_SPLITS
from kshot.data.omniglot import omniglot
from kshot.data.tiered import TieredImageNetSpec, load_tiered_spec

FOLDER_SPLITS = ("train", "val", "test")
Rotations = tuple[Annotated[int, Field(multiple_of=90)], ...]


@dataclass(config=STRICT)
class OmniglotSpec:
    """Omniglot (Vinyals split by default). `rotations`, if set, is class augmentation for the training split
    only; evaluation splits keep their own definition (Vinyals' val/test count 4 rotations as classes)."""

    name: Literal["omniglot"] = "omniglot"
    image_size: Annotated[int, Field(ge=4)] = 28
    root: str | None = None
    archives: str | None = None
    rotations: Rotations | None = None


@dataclass(config=STRICT)
class FolderSpec:
    """A folder with one sub-folder per class (or train/ val/ test/ folders of those). image_size and channels
    left unset are derived from the images (see `kshot.data.folder.infer_contract`); without split folders the
    classes are split once, deterministically, by `class_fractions`."""

    path: str
    name: Literal["folder"] = "folder"
    image_size: PositiveInt | None = None
    channels: Literal[1, 3] | None = None
    resize: ResizeFilter = "bilinear"
    invert: bool = False
    class_fractions: dict[Literal["train", "val", "test"], Fraction] = \
        Field(default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2})
    rotations: Rotations | None = None


DatasetLoader = Callable[[dict[str, Any], str, "InputContract | None"], ClassDataset]
"""(checked spec as a dict, split name, a model's contract or None) -> the split as a ClassDataset."""

DATASETS: dict[str, tuple[type, DatasetLoader]] = {}
"""Every dataset kind by its recipe name: its spec schema and its loader (see `register_dataset`)."""


def register_dataset(name: str, spec: type, loader: DatasetLoader) -> None:
    """Make a dataset kind usable by name in recipes, the CLI and `load_dataset`. `spec` is a STRICT pydantic
    dataclass with a `name: Literal[name]` field; `loader(spec_dict, split, contract)` returns a ClassDataset whose
    `contract` says how its files were decoded (and refuses a model contract it cannot honour)."""
    DATASETS[name] = (spec, loader)


def parse_dataset_spec(spec: Mapping[str, Any] | None, where: str = "dataset") -> dict[str, Any]:
    """The dataset section checked against its kind's schema, with defaults filled in."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{where}.name: missing; choose one of {', '.join(DATASETS)} "
                          f"(e.g. {{name: folder, path: /my/images}})")
    kind = spec["name"]
    if kind not in DATASETS:
        raise ConfigError(f"{where}.name: unknown dataset {kind!r}; choose one of {', '.join(DATASETS)}")
    return as_dict(parse(DATASETS[kind][0], spec, where))


def folder_splits(root: Path) -> list[str]:
    return [s for s in FOLDER_SPLITS if (root / s).is_dir()]


def folder_contract(spec: dict[str, Any]) -> tuple[InputContract, str]:
    """One contract for every split of a folder dataset, derived once from all of its images."""
    root = Path(spec["path"]).expanduser()
    splits = folder_splits(root)
    folders = [c for s in splits for c in class_folders(root / s)] if splits else class_folders(root)
    files = [f for folder in folders for f in image_files(folder)]
    return infer_contract(files, spec.get("image_size"), spec.get("channels"), spec.get("resize", "bilinear"),
                          bool(spec.get("invert", False)))


def _folder_split(spec: dict[str, Any], split: str, contract: InputContract | None) -> ClassDataset:
    root = Path(spec["path"]).expanduser()
    if contract is None:
        contract, _ = folder_contract(spec)
    splits = folder_splits(root)
    if (root / split).is_dir():
        return image_folder(root / split, contract=contract, name=f"{root.name}-{split}")
    if split == "all" or not splits:
        full = image_folder(root, contract=contract)
        if split == "all":
            return full
        fractions = spec.get("class_fractions") or {"train": 0.6, "val": 0.2, "test": 0.2}
        ids = class_split(full.num_base_classes, fractions).get(split)
        if not ids:
            raise InputError(f"{root} has too few classes ({full.num_base_classes}) for a {split} split with "
                             f"class_fractions {fractions}; add classes or change dataset.class_fractions")
        return full.subset(ids, name=f"{root.name}-{split}")
    raise FileNotFoundError(f"{root} has split folders ({', '.join(splits)}) but no {split}/; add it or ask for "
                            f"another split")


def class_split(classes: int, fractions: Mapping[str, float]) -> dict[str, list[int]]:
    """Base-class ids of each split: one fixed shuffle (seed 0), cut by `fractions` in train/val/test order."""
    order = torch.randperm(classes, generator=torch.Generator().manual_seed(0)).tolist()
    split, start = {}, 0
    for name in FOLDER_SPLITS:
        size = round(fractions.get(name, 0.0) * classes)
        split[name] = sorted(order[start:start + size])
        start += size
    return split


def _load_omniglot(spec: dict[str, Any], split: str, contract: InputContract | None) -> ClassDataset:
    if split not in OMNIGLOT_SPLITS:
        raise ConfigError(f"split {split!r} is not an Omniglot split; choose one of {', '.join(OMNIGLOT_SPLITS)}")
    dataset = omniglot(split, root=spec["root"], image_size=spec["image_size"], archives=spec["archives"])
    return check_decoded_as(contract, dataset, f"set dataset.image_size={contract and contract.image_size}")


register_dataset("omniglot", OmniglotSpec, _load_omniglot)
register_dataset("folder", FolderSpec, _folder_split)
register_dataset("cifar-fs", CifarFSSpec, load_cifar_spec)
register_dataset("fc100", FC100Spec, load_cifar_spec)
register_dataset("cub", CubSpec, load_cub_spec)
register_dataset("tiered-imagenet", TieredImageNetSpec, load_tiered_spec)


@dataclass(config=STRICT)
class MiniImageNetSpec:
    """miniImageNet, Ravi & Larochelle's 64 / 16 / 20 class split, 84x84 RGB. `source`: a folder of train/ val/
    test/ class folders, of images/ with the split CSVs, or of mini-imagenet-cache-*.pkl (default
    $KSHOT_MINIIMAGENET; only needed until the split is cached under `root`); `check: false` accepts a subset."""

    name: Literal["miniimagenet"] = "miniimagenet"
    source: str | None = None
    root: str | None = None
    check: bool = True
    rotations: Rotations | None = None


def _load_miniimagenet(spec: dict[str, Any], split: str, contract: InputContract | None) -> ClassDataset:
    if split not in MINIIMAGENET_SPLITS:
        raise ConfigError(f"split {split!r} is not a miniImageNet split; choose one of "
                          f"{', '.join(MINIIMAGENET_SPLITS)}")
    dataset = miniimagenet(split, root=spec["root"], source=spec["source"], check=spec["check"])
    return check_decoded_as(contract, dataset, "evaluate this model on data decoded its way")


register_dataset("miniimagenet", MiniImageNetSpec, _load_miniimagenet)


def load_dataset(spec: Mapping[str, Any], split: str, contract: InputContract | None = None,
                 augment: bool = False) -> ClassDataset:
    """The `split` of the dataset described by `spec` ({"name": ..., options}).

    `contract` decodes files as a model expects (evaluation and prediction); `augment` applies the spec's
    `rotations` (training-time class augmentation, never applied to evaluation splits)."""
    spec = parse_dataset_spec(spec)
    dataset = DATASETS[spec["name"]][1](spec, split, contract)
    if augment and spec.get("rotations") is not None:
        dataset = dataset.with_rotations(tuple(spec["rotations"]))
    return dataset
