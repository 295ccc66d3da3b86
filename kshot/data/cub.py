"""CUB-200-2011 (Wah et al. 2011): 200 bird species, 11,788 photos, with the few-shot split of Chen et al. 2019.

Source: the canonical archive `CUB_200_2011.tgz` (downloaded and checked by md5, or a local copy named by
`archive=` or $KSHOT_CUB_ARCHIVE), whose photos are `CUB_200_2011/images/<NNN.Class_name>/*.jpg`.

Split (Chen et al. 2019, "A Closer Look at Few-shot Classification", `filelists/CUB/write_CUB_filelist.py`):
the class folders in sorted order, class i is base (train) when i % 2 == 0 (100 classes), val when i % 4 == 1
(50) and novel (test) when i % 4 == 3 (50).

Images: each whole photo is resized to image_size x image_size RGB (84 by default, bilinear; the aspect ratio
is not kept, and grey photos become RGB). Cropping to the bird's bounding box (`bounding_boxes.txt`), which some
papers do, is out of scope here.

The archive is read in one pass, to its end (so a truncated or corrupt archive is refused before anything is
written), decoding every photo at image_size; then the three split caches are written, each atomically. That
pass holds the decoded photos in memory (250 MB at 84x84).
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass

from kshot.config import STRICT
from kshot.data.contract import InputContract, InputError, check_decoded_as
from kshot.data.dataset import ClassDataset, check_split_and_size
from kshot.data.download import local_or_download
from kshot.data.image_cache import cache_folder, read_image_cache, write_image_cache
from kshot.data.paths import data_root
from kshot.progress import progress_bar

ARCHIVE_URL = "https://data.caltech.edu/records/65de6-vd42c/files/CUB_200_2011.tgz"
ARCHIVE_MD5 = "97eceeb196236b17998738112f37df78"
ARCHIVE_NAME = "CUB_200_2011.tgz"
ARCHIVE_ENV = "KSHOT_CUB_ARCHIVE"
IMAGE_MEMBER = re.compile(r"^CUB_200_2011/images/(\d{3}\.[^/]+)/([^/.][^/]*\.jpg)$")
CLASSES, IMAGES = 200, 11_788
SPLITS = ("train", "val", "test")
SPLIT_CLASSES = {"train": 100, "val": 50, "test": 50}


class CubError(ValueError):
    """A CUB-200-2011 archive or cache that is missing, corrupt, truncated or not CUB-200-2011."""


def cub_contract(image_size: int = 84) -> InputContract:
    """CUB as stored: RGB, each whole photo resized (bilinear) to image_size x image_size."""
    return InputContract(channels=3, image_size=image_size, resize="bilinear")


def chen_split(class_names: list[str]) -> dict[str, list[str]]:
    """Chen et al.'s split of the class folder names: sorted, then i % 2 == 0 train, i % 4 == 1 val,
    i % 4 == 3 test."""
    ordered = sorted(class_names)
    return {"train": [c for i, c in enumerate(ordered) if i % 2 == 0],
            "val": [c for i, c in enumerate(ordered) if i % 4 == 1],
            "test": [c for i, c in enumerate(ordered) if i % 4 == 3]}


def find_archive(root: str | Path | None, archive: str | Path | None, download: bool) -> Path:
    """The CUB archive: `archive`, else $KSHOT_CUB_ARCHIVE, else the copy under the data root, else a download
    from the canonical URL (checked by md5, written atomically)."""
    return local_or_download(archive, ARCHIVE_ENV, data_root(root) / "cub" / ARCHIVE_NAME, ARCHIVE_URL, ARCHIVE_MD5,
                             download, CubError)


def read_archive(path: Path, image_size: int, check: bool, progress: bool) -> dict[str, list[np.ndarray]]:
    """Every photo of the archive decoded at image_size, by class folder name (photos sorted by file name)."""
    contract = cub_contract(image_size)
    photos: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    try:
        with gzip.open(path, "rb") as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in progress_bar(tar, desc=f"reading {path.name}", enabled=progress, leave=False):
                    match = IMAGE_MEMBER.match(member.name)
                    if not (member.isfile() and match):
                        continue
                    data = tar.extractfile(member).read()
                    try:
                        image = contract.decode(io.BytesIO(data))
                    except InputError as error:
                        raise CubError(f"{path}: {member.name} is not a readable image; the archive is corrupt: "
                                       f"delete it and download it again") from error
                    photos[match.group(1)].append((match.group(2), image))
            while stream.read(1 << 20):  # the gzip trailer's CRC and length are checked only at the end
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise CubError(f"{path} is not a readable CUB-200-2011 archive ({error}); it is corrupt or truncated: "
                       f"delete it and download it again") from error
    found = sum(len(files) for files in photos.values())
    if not photos or (check and (len(photos) != CLASSES or found != IMAGES)):
        raise CubError(f"{path} holds {len(photos)} classes and {found} photos under CUB_200_2011/images/, "
                       f"expected {CLASSES} and {IMAGES}; it is not the CUB-200-2011 archive or is incomplete"
                       f"{' (check=False skips this check)' if photos else ''}")
    return {name: [image for _, image in sorted(files, key=lambda f: f[0])] for name, files in photos.items()}


def convert(archive: Path, root: str | Path | None, image_size: int, check: bool, progress: bool) -> None:
    """Write the missing split caches from the verified archive (each cache atomically)."""
    photos = read_archive(archive, image_size, check, progress)
    for split, names in chen_split(list(photos)).items():
        folder = cache_folder("cub", f"{split}-{image_size}px", root)
        if not folder.exists() and names:
            write_image_cache(folder, [(name, photos[name]) for name in names], (3, image_size, image_size),
                              cub_contract(image_size), progress=progress,
                              metadata={"dataset": "cub", "split": split, "source": str(archive)})


def cub(split: str = "train", root: str | Path | None = None, image_size: int = 84,
        archive: str | Path | None = None, download: bool = True, check: bool = True,
        progress: bool = True) -> ClassDataset:
    """A CUB-200-2011 split (Chen et al.: train = base, 100 classes; val, 50; test = novel, 50) as a
    memory-mapped `ClassDataset`. `check` verifies the archive (200 classes, 11,788 photos) and the split's class
    count; turn it off only for a partial copy, such as a test fixture."""
    check_split_and_size("CUB", split, SPLITS, image_size)
    folder = cache_folder("cub", f"{split}-{image_size}px", root)
    if not folder.exists():
        convert(find_archive(root, archive, download), root, image_size, check, progress)
    if not folder.exists():
        raise CubError(f"the CUB archive holds no class of the {split} split (check=False with too few classes)")
    dataset = read_image_cache(folder, f"cub-{split}-{image_size}px")
    if check and dataset.num_base_classes != SPLIT_CLASSES[split]:
        raise CubError(f"cache {folder} holds {dataset.num_base_classes} classes, expected {SPLIT_CLASSES[split]}; "
                       f"it was built from a partial archive with check=False: delete it to rebuild it")
    return dataset


@dataclass(config=STRICT)
class CubSpec:
    """CUB-200-2011 (Chen et al. split) from `archive`, else $KSHOT_CUB_ARCHIVE, else downloaded; `root` is where
    the archive and caches live; photos are resized to image_size."""

    name: Literal["cub"] = "cub"
    image_size: Annotated[int, Field(ge=4)] = 84
    archive: str | None = None
    root: str | None = None
    check: bool = True
    rotations: tuple[Annotated[int, Field(multiple_of=90)], ...] | None = None


def load_cub_spec(spec: dict[str, Any], split: str, contract: InputContract | None) -> ClassDataset:
    """The registry's loader; a model contract other than the cache's is refused in one line."""
    dataset = cub(split, root=spec["root"], image_size=spec["image_size"], archive=spec["archive"],
                  check=spec["check"])
    return check_decoded_as(contract, dataset, f"set dataset.image_size={contract and contract.image_size}")
