"""CIFAR-FS and FC100: two few-shot class splits of CIFAR-100 (100 classes of 600 32x32 colour images each).

Both read the canonical CIFAR-100 python archive (downloaded and checked by md5, or a local copy named by
`archive=` or $KSHOT_CIFAR100_ARCHIVE), whose `train`, `test` and `meta` members are Python 2 pickles of NumPy
arrays: they are read with `kshot.data.safe_pickle`, never with plain `pickle`. Each class keeps its 500 CIFAR
training and 100 CIFAR test images (600), as Bertinetto et al. and Oreshkin et al. did. Each split is converted
once into a memory-mapped image cache (`kshot.data.image_cache`).

Splits, stated here as code:

- CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers"): 64 / 16 / 20
  classes, from the split files published with R2D2 (github.com/bertinetto/r2d2, `splits/bertinetto/`), as
  copied by torchmeta (`torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json`) and used by
  MetaOptNet and learn2learn.
- FC100 (Oreshkin et al. 2018, "TADAM: Task dependent adaptive metric for improved few-shot learning"): split
  by superclass, 12 / 4 / 4 superclasses (60 / 20 / 20 classes), the superclass lists of torchmeta's
  `torchmeta/datasets/assets/cifar100/fc100/*.json`, which reproduce TADAM's split.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass

from kshot.config import STRICT
from kshot.data.contract import InputContract, check_decoded_as
from kshot.data.dataset import ClassDataset, check_split_and_size
from kshot.data.download import local_or_download
from kshot.data.image_cache import cache_folder, read_image_cache, write_image_cache
from kshot.data.paths import data_root
from kshot.data.safe_pickle import UnsafePickleError, safe_loads

ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_ENV = "KSHOT_CIFAR100_ARCHIVE"
MEMBERS = ("train", "test", "meta")
CIFAR_IMAGES = {"train": 50_000, "test": 10_000}
IMAGES_PER_CLASS = 600
SPLITS = ("train", "val", "test")

CIFAR_FS_CLASSES = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant",
        "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate",
        "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle",
        "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
        "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy", "rocket",
        "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ),
}
"""CIFAR-FS classes (Bertinetto et al. 2019) by split: 64 / 16 / 20 CIFAR-100 fine labels."""

FC100_SUPERCLASSES = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees",
        "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
"""FC100 superclasses (Oreshkin et al. 2018) by split: 12 / 4 / 4 CIFAR-100 coarse labels, 5 classes each."""

CLASSES_PER_SUPERCLASS = 5
Kind = Literal["cifar-fs", "fc100"]


class CifarError(ValueError):
    """A CIFAR-100 archive or cache that is missing, corrupt, truncated or not CIFAR-100."""


def cifar_contract() -> InputContract:
    """CIFAR images as stored: RGB at their native 32x32 (never resized)."""
    return InputContract(channels=3, image_size=32)


# ------------------------------------------------------------------------------------------------ the archive
def find_archive(root: str | Path | None, archive: str | Path | None, download: bool) -> Path:
    """The CIFAR-100 archive: `archive`, else $KSHOT_CIFAR100_ARCHIVE, else the copy under the data root, else a
    download from the canonical URL (checked by md5, written atomically)."""
    cached = data_root(root) / "cifar-100" / ARCHIVE_NAME
    return local_or_download(archive, ARCHIVE_ENV, cached, ARCHIVE_URL, ARCHIVE_MD5, download, CifarError)


def read_archive(path: Path) -> dict[str, Any]:
    """The `train`, `test` and `meta` pickles of the archive. The archive is read to its very end first (so a
    truncated or corrupt one is refused by its gzip CRC before anything is unpickled or written), then each
    member is unpickled by the restricted unpickler."""
    raw: dict[str, bytes] = {}
    try:
        with gzip.open(path, "rb") as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    folder, _, name = member.name.rpartition("/")
                    if member.isfile() and folder == "cifar-100-python" and name in MEMBERS:
                        raw[name] = tar.extractfile(member).read()
            while stream.read(1 << 20):  # the gzip trailer's CRC and length are checked only at the end
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise CifarError(f"{path} is not a readable CIFAR-100 archive ({error}); it is corrupt or truncated: "
                         f"delete it and download it again") from error
    missing = [name for name in MEMBERS if name not in raw]
    if missing:
        raise CifarError(f"{path} has no cifar-100-python/{', '.join(missing)}; it is not the CIFAR-100 python "
                         f"archive ({ARCHIVE_URL})")
    found = {}
    for name in MEMBERS:
        try:
            found[name] = safe_loads(raw.pop(name))
        except UnsafePickleError as error:
            raise CifarError(f"{path}: cifar-100-python/{name}: {error}") from error
        except Exception as error:  # noqa: BLE001 - whatever a damaged pickle raises, it is not CIFAR-100
            raise CifarError(f"{path}: cifar-100-python/{name} is not a readable pickle ({error}); it is not the "
                             f"CIFAR-100 python archive") from error
    return found


def _field(table: Any, key: str, where: str) -> Any:
    """`table[key]` for pickles written by Python 2 (str keys once read as latin-1) or Python 3 (bytes keys)."""
    if isinstance(table, Mapping):
        for candidate in (key, key.encode()):
            if candidate in table:
                return table[candidate]
    raise CifarError(f"{where} has no {key!r} entry; it is not a CIFAR-100 python pickle")


def _names(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class CifarTables:
    """CIFAR-100's train and test images as uint8 [N, 3, 32, 32] with fine and coarse labels, and label names."""

    def __init__(self, pickles: dict[str, Any], path: Path, check: bool) -> None:
        self.fine_names = _names(_field(pickles["meta"], "fine_label_names", f"{path}: meta"))
        self.coarse_names = _names(_field(pickles["meta"], "coarse_label_names", f"{path}: meta"))
        self.parts = [self._part(pickles[part], f"{path}: {part}") for part in ("train", "test")]
        if check:
            counts = {part: len(images) for part, (images, _, _) in zip(("train", "test"), self.parts)}
            if len(self.fine_names) != 100 or len(self.coarse_names) != 20 or counts != CIFAR_IMAGES:
                raise CifarError(f"{path} holds {len(self.fine_names)} classes, {len(self.coarse_names)} "
                                 f"superclasses and {counts} images, expected 100, 20 and {CIFAR_IMAGES}; it is "
                                 f"not the full CIFAR-100 archive (check=False skips this check)")

    @staticmethod
    def _part(table: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = _field(table, "data", where)
        fine = np.asarray(_field(table, "fine_labels", where), dtype=np.int64)
        coarse = np.asarray(_field(table, "coarse_labels", where), dtype=np.int64)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                or fine.shape != (len(data),) or coarse.shape != (len(data),):
            raise CifarError(f"{where}: expected uint8 data [N, 3072] with N fine and coarse labels, got "
                             f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}; it is "
                             f"not a CIFAR-100 python pickle")
        return data.reshape(-1, 3, 32, 32), fine, coarse  # rows are 1024 red, 1024 green, 1024 blue values

    def class_id(self, name: str) -> int:
        if name not in self.fine_names:
            raise CifarError(f"the archive's meta names no class {name!r}; it is not CIFAR-100")
        return self.fine_names.index(name)

    def images(self, fine_id: int) -> np.ndarray:
        """Every image of one class: its CIFAR training images, then its CIFAR test images."""
        return np.concatenate([images[fine == fine_id] for images, fine, _ in self.parts])

    def split_classes(self, kind: Kind, split: str) -> list[int]:
        """Fine-label ids of a split, in CIFAR's (alphabetical) label order."""
        if kind == "cifar-fs":
            return sorted(self.class_id(name) for name in CIFAR_FS_CLASSES[split])
        unknown = [s for s in FC100_SUPERCLASSES[split] if s not in self.coarse_names]
        if unknown:
            raise CifarError(f"the archive's meta names no superclass {unknown[0]!r}; it is not CIFAR-100")
        wanted = [self.coarse_names.index(s) for s in FC100_SUPERCLASSES[split]]
        return sorted({int(f) for _, fine, coarse in self.parts for f in fine[np.isin(coarse, wanted)]})


def expected_classes(kind: Kind, split: str) -> int:
    if kind == "cifar-fs":
        return len(CIFAR_FS_CLASSES[split])
    return CLASSES_PER_SUPERCLASS * len(FC100_SUPERCLASSES[split])


def convert(kind: Kind, archive: Path, root: str | Path | None, check: bool, progress: bool) -> None:
    """Write the missing split caches of `kind` from the verified archive (each cache atomically)."""
    tables = CifarTables(read_archive(archive), archive, check)
    for split in SPLITS:
        folder = cache_folder(kind, f"{split}-32px", root)
        if folder.exists():
            continue
        ids = tables.split_classes(kind, split)
        classes = [(tables.fine_names[i], tables.images(i)) for i in ids]
        if check:
            _check_counts(kind, split, [(name, len(images)) for name, images in classes], str(archive))
        classes = [(name, images) for name, images in classes if len(images)]  # check=False: absent classes
        if classes:
            write_image_cache(folder, classes, (3, 32, 32), cifar_contract(),
                              metadata={"dataset": kind, "split": split, "source": str(archive)},
                              progress=progress)


def _check_counts(kind: Kind, split: str, counts: list[tuple[str, int]], where: str) -> None:
    expected = expected_classes(kind, split)
    wrong = [(name, n) for name, n in counts if n != IMAGES_PER_CLASS]
    if len(counts) != expected or wrong:
        detail = f"; {wrong[0][0]!r} has {wrong[0][1]}" if wrong else ""
        raise CifarError(f"{where}: {kind} {split} has {len(counts)} classes, expected {expected} of "
                         f"{IMAGES_PER_CLASS} images{detail}; it is not the full CIFAR-100 (check=False skips this "
                         f"check)")


# -------------------------------------------------------------------------------------------------- datasets
def cifar_split(kind: Kind, split: str = "train", root: str | Path | None = None, archive: str | Path | None = None,
                download: bool = True, check: bool = True, progress: bool = True) -> ClassDataset:
    """A CIFAR-FS or FC100 split as a memory-mapped `ClassDataset` (32x32 RGB, 600 images a class).

    `check` verifies the archive and the split (100 classes, 50,000 + 10,000 images, the split's class count,
    600 images a class); turn it off only for a partial copy, such as a test fixture."""
    check_split_and_size(kind, split, SPLITS)
    folder = cache_folder(kind, f"{split}-32px", root)
    if not folder.exists():
        convert(kind, find_archive(root, archive, download), root, check, progress)
    if not folder.exists():
        raise CifarError(f"the CIFAR-100 archive holds no image of a {kind} {split} class (a partial archive read "
                         f"with check=False)")
    dataset = read_image_cache(folder, f"{kind}-{split}")
    if check:
        _check_counts(kind, split, list(zip(dataset.base_names, dataset.counts().tolist())), f"cache {folder}")
    return dataset


def cifar_fs(split: str = "train", root: str | Path | None = None, archive: str | Path | None = None,
             download: bool = True, check: bool = True, progress: bool = True) -> ClassDataset:
    """CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 CIFAR-100 classes for train / val / test."""
    return cifar_split("cifar-fs", split, root, archive, download, check, progress)


def fc100(split: str = "train", root: str | Path | None = None, archive: str | Path | None = None,
          download: bool = True, check: bool = True, progress: bool = True) -> ClassDataset:
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60 / 20 / 20 classes for train / val / test."""
    return cifar_split("fc100", split, root, archive, download, check, progress)


# ------------------------------------------------------------------------------------------- recipe sections
@dataclass(config=STRICT)
class CifarFSSpec:
    """CIFAR-FS from the CIFAR-100 archive (`archive`, else $KSHOT_CIFAR100_ARCHIVE, else downloaded); `root` is
    where the archive and caches live. Images stay 32x32 RGB."""

    name: Literal["cifar-fs"] = "cifar-fs"
    archive: str | None = None
    root: str | None = None
    check: bool = True
    rotations: tuple[Annotated[int, Field(multiple_of=90)], ...] | None = None


@dataclass(config=STRICT)
class FC100Spec:
    """FC100 from the CIFAR-100 archive; the same options as `CifarFSSpec`."""

    name: Literal["fc100"] = "fc100"
    archive: str | None = None
    root: str | None = None
    check: bool = True
    rotations: tuple[Annotated[int, Field(multiple_of=90)], ...] | None = None


def load_cifar_spec(spec: dict[str, Any], split: str, contract: InputContract | None) -> ClassDataset:
    """The registry's loader for both kinds; a model contract other than 32x32 RGB is refused."""
    dataset = cifar_split(spec["name"], split, root=spec["root"], archive=spec["archive"], check=spec["check"])
    return check_decoded_as(contract, dataset, "train a model on it, or choose a dataset of that shape")

