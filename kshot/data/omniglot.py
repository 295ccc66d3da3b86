"""Omniglot (Lake et al. 2015): download, verify, convert once to a cached uint8 tensor file, and split.

Sources, in order: a folder of local archives (`archives=` or KSHOT_OMNIGLOT_ARCHIVES), archives already
downloaded under the data root, or a download from the canonical URLs (checked by md5). Local archives are
checked by their contents (alphabets, characters, drawings per character), since repacked copies have another
md5. The Vinyals split used by Matching and Prototypical Networks is stated here as code.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kshot.data.contract import omniglot_contract
from kshot.data.dataset import ROTATIONS, ClassDataset, check_split_and_size
from kshot.data.download import atomic_path, download
from kshot.data.paths import data_root
from kshot.progress import progress_bar

BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
ARCHIVES = {
    # name: (md5 of the canonical archive, alphabets, characters)
    "images_background": ("68d2efa1b9178cc56df9314c21c6e718", 30, 964),
    "images_evaluation": ("6b91aef0f799c5bb55b94e3f2daec811", 20, 659),
}
DRAWINGS_PER_CHARACTER = 20
ARCHIVES_ENV = "KSHOT_OMNIGLOT_ARCHIVES"

VINYALS_TEST_ALPHABETS = (
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya",
    "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
)
VINYALS_TEST_EXTRA = tuple(f"Gurmukhi/character{n}" for n in (42, 43, 44, 45))
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
SPLITS = ("train", "val", "trainval", "test", "background", "evaluation", "all")


class OmniglotError(RuntimeError):
    """Omniglot archives or cache that are missing, corrupt or of the wrong layout."""


def _archive_layout(archive: Path, name: str) -> dict[str, list[str]]:
    """Map "Alphabet/characterNN" to its PNG members, raising if the archive is not the expected one."""
    _, alphabets, characters = ARCHIVES[name]
    try:
        with zipfile.ZipFile(archive) as handle:
            members = handle.namelist()
            broken = handle.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise OmniglotError(f"{archive} is not a readable zip archive ({error}); delete it and download again") \
            from error
    if broken is not None:
        raise OmniglotError(f"{archive}: member {broken} fails its CRC check; the archive is corrupt")
    pattern = re.compile(rf"^{name}/([^/]+)/(character\d+)/([^/]+\.png)$")
    layout: dict[str, list[str]] = defaultdict(list)
    for member in members:
        match = pattern.match(member)
        if match:
            layout[f"{match.group(1)}/{match.group(2)}"].append(member)
    found_alphabets = {key.split("/")[0] for key in layout}
    wrong = {key: len(files) for key, files in layout.items() if len(files) != DRAWINGS_PER_CHARACTER}
    if len(found_alphabets) != alphabets or len(layout) != characters or wrong:
        detail = f"; characters without {DRAWINGS_PER_CHARACTER} drawings: {dict(list(wrong.items())[:3])}" \
            if wrong else ""
        raise OmniglotError(
            f"{archive} holds {len(found_alphabets)} alphabets and {len(layout)} characters under {name}/, "
            f"expected {alphabets} and {characters}{detail}; it is not the Omniglot {name} archive or is "
            f"incomplete")
    return {key: sorted(layout[key]) for key in sorted(layout)}


def _find_archive(name: str, raw_dir: Path, archives: Path | None, download_missing: bool) -> Path:
    if archives is not None:
        candidate = Path(archives) / f"{name}.zip"
        if not candidate.is_file():
            raise OmniglotError(f"{candidate} not found: the archives folder must hold {name}.zip")
        return candidate
    candidate = raw_dir / f"{name}.zip"
    if candidate.is_file():
        return candidate
    if not download_missing:
        raise OmniglotError(f"{candidate} not found and download=False; pass download=True, or point "
                            f"{ARCHIVES_ENV} at a folder holding the Omniglot archives")
    return download(f"{BASE_URL}/{name}.zip", candidate, md5=ARCHIVES[name][0])


def _decode(data: bytes, image_size: int) -> np.ndarray:
    """One archive PNG as kshot's Omniglot contract says: grey, LANCZOS, strokes inverted to light on dark (as
    the reference code stores them)."""
    return omniglot_contract(image_size).decode(io.BytesIO(data))


def convert_archives(paths: dict[str, Path], target: Path, image_size: int, progress: bool = True) -> Path:
    """Decode every drawing of the verified archives once into one safetensors file (written atomically)."""
    names: list[str] = []
    blocks: list[np.ndarray] = []
    for name, archive in paths.items():
        layout = _archive_layout(archive, name)
        with zipfile.ZipFile(archive) as handle:
            for character, members in progress_bar(layout.items(), desc=f"converting {name}", enabled=progress,
                                                   leave=False):
                names.append(character)
                blocks.extend(_decode(handle.read(member), image_size) for member in members)
    images = torch.from_numpy(np.stack(blocks)).contiguous()
    offsets = torch.arange(len(names) + 1, dtype=torch.long) * DRAWINGS_PER_CHARACTER
    with atomic_path(target) as partial:
        save_file({"images": images, "offsets": offsets}, str(partial),
                  metadata={"classes": json.dumps(names), "image_size": str(image_size)})
    return target


def load_omniglot(root: str | Path | None = None, image_size: int = 28, archives: str | Path | None = None,
                  download: bool = True, progress: bool = True) -> ClassDataset:
    """All 1,623 Omniglot characters (background then evaluation alphabets), 20 drawings each, unrotated."""
    check_split_and_size("Omniglot", image_size=image_size)
    folder = data_root(root) / "omniglot"
    cache = folder / f"omniglot_{image_size}px.safetensors"
    if not cache.is_file():
        archives = archives if archives is not None else os.environ.get(ARCHIVES_ENV) or None
        paths = {name: _find_archive(name, folder / "raw", Path(archives) if archives else None, download)
                 for name in ARCHIVES}
        convert_archives(paths, cache, image_size, progress)
    tensors = load_file(str(cache))
    with safe_open(str(cache), framework="pt") as handle:  # the class names live in the header's metadata
        names = json.loads(handle.metadata()["classes"])
    images, offsets = tensors["images"], tensors["offsets"]
    expected = sum(characters for _, _, characters in ARCHIVES.values())
    if len(names) != expected or images.shape != (expected * DRAWINGS_PER_CHARACTER, 1, image_size, image_size):
        raise OmniglotError(f"{cache} does not hold the expected Omniglot tensors; delete it to rebuild it")
    return ClassDataset(images, offsets, names, name=f"omniglot-{image_size}px",
                        contract=omniglot_contract(image_size))


def vinyals_split(names: list[str]) -> dict[str, list[int]]:
    """Base-class indices of the Vinyals et al. (2016) train / val / test characters (before rotation)."""
    split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for index, character in enumerate(names):
        alphabet = character.split("/")[0]
        if alphabet in VINYALS_TEST_ALPHABETS or character in VINYALS_TEST_EXTRA:
            split["test"].append(index)
        elif alphabet in VINYALS_VAL_ALPHABETS:
            split["val"].append(index)
        else:
            split["train"].append(index)
    split["trainval"] = sorted(split["train"] + split["val"])
    return split


def omniglot(split: str = "train", root: str | Path | None = None, image_size: int = 28,
             archives: str | Path | None = None, download: bool = True, rotations: tuple[int, ...] | None = None,
             progress: bool = True) -> ClassDataset:
    """An Omniglot split as a `ClassDataset`.

    train / val / trainval / test follow Vinyals et al. (1,028 / 172 / 1,200 / 423 characters) and by default
    count each of four rotations as its own class; background / evaluation are Lake's alphabets (964 / 659)
    and all is every character, unrotated by default.
    """
    check_split_and_size("Omniglot", split, SPLITS)
    full = load_omniglot(root, image_size, archives, download, progress)
    if split in ("train", "val", "trainval", "test"):
        ids = vinyals_split(full.base_names)[split]
        default_rotations: tuple[int, ...] = ROTATIONS
    else:
        background = ARCHIVES["images_background"][2]
        ids = {"background": list(range(background)),
               "evaluation": list(range(background, full.num_base_classes)),
               "all": list(range(full.num_base_classes))}[split]
        default_rotations = (0,)
    subset = full.subset(ids, name=f"omniglot-{split}-{image_size}px")
    return subset.with_rotations(rotations if rotations is not None else default_rotations)
