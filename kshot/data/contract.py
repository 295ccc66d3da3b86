"""The input contract: how a file on disk becomes the tensor a model was trained on.

Every dataset built from files declares its contract (channels, size, resize filter, polarity, normalisation),
every model records the contract of the data it was trained on, and every entry point that takes images
(`FewShotModel.adapt/predict/evaluate`, `image_folder`, `kshot evaluate --data`, `kshot predict`) decodes files
with the model's contract, so the same raw file gives the same tensor at training and at prediction.

Two stages: `decode` turns a file into uint8 [C, S, S] (what datasets store), and `to_model` turns uint8 (or
float in [0, 1]) into the float tensor the network sees (scale to [0, 1], then optional per-channel mean/std).

Training augmentation (`kshot.data.augment`) is not part of the contract: it is never applied at evaluation or
prediction, and a contract travels onto every dataset decoded with it and is compared for equality with theirs.
It is recorded beside the contract instead, as `train_augmentation` in the model's checkpoint.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from kshot.config import STRICT, ConfigError, PositiveInt, as_dict, parse

RESIZE_FILTERS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
                  "bilinear": Image.Resampling.BILINEAR, "hamming": Image.Resampling.HAMMING,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
ResizeFilter = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]


class InputError(ValueError):
    """Images that cannot be turned into what the model expects (unreadable, NaN, wrong range or shape)."""


@dataclass(config=STRICT)
class InputContract:
    """What turns a file into the model's input.

    channels: 1 (grey) or 3 (RGB); image_size: the side of the square the image is resized to; resize: the
    PIL filter used; invert: store 255 - value (dark strokes on light paper become light on dark, as
    kshot's Omniglot does); mean/std: per-channel normalisation applied after scaling to [0, 1] (None: none).
    """

    channels: Literal[1, 3]
    image_size: PositiveInt
    resize: ResizeFilter = "bilinear"
    invert: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[Annotated[float, Field(gt=0)], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.channels:
                raise ValueError(f"{name} needs one value per channel ({self.channels}), got {list(value)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")

    # ------------------------------------------------------------------------------------------ records
    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | InputContract, where: str = "input") -> InputContract:
        return parse(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def replace(self, **changes: Any) -> InputContract:
        return InputContract.from_dict({**self.to_dict(), **changes})

    def differences(self, other: InputContract) -> list[str]:
        """Human-readable `field: mine vs other` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}={theirs[key]!r} (the model expects {mine[key]!r})" for key in mine if mine[key] != theirs[key]]

    def describe(self) -> str:
        norm = f", mean {list(self.mean)}, std {list(self.std)}" if self.mean is not None else ""
        return (f"{self.channels}-channel {self.image_size}x{self.image_size}, {self.resize} resize, "
                f"{'inverted' if self.invert else 'not inverted'}{norm}")

    # ---------------------------------------------------------------------------------------- stage 1
    def decode(self, source: str | Path | BinaryIO) -> np.ndarray:
        """One image file (a path, or an open binary file) as uint8 [channels, image_size, image_size]."""
        array = read_image(Path(source) if isinstance(source, str) else source, self.channels)
        image = Image.fromarray(array if self.channels == 3 else array[..., 0], "RGB" if self.channels == 3 else "L")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), RESIZE_FILTERS[self.resize])
        out = np.asarray(image, dtype=np.uint8)
        out = out[None] if self.channels == 1 else out.transpose(2, 0, 1)
        return 255 - out if self.invert else out

    def decode_files(self, paths: list[str | Path]) -> Tensor:
        """Image files as uint8 [count, channels, image_size, image_size]."""
        if not paths:
            raise InputError("no images given")
        return torch.from_numpy(np.stack([self.decode(p) for p in paths]))

    # ---------------------------------------------------------------------------------------- stage 2
    def to_model(self, images: Tensor) -> Tensor:
        """uint8 images (0-255), or float images in [0, 1], as the float input of the network."""
        out = images.mul(1.0 / 255.0) if images.dtype == torch.uint8 else images.to(torch.float32)
        if self.mean is not None and self.std is not None:
            shape = (1, -1, 1, 1) if out.dim() == 4 else (-1, 1, 1)
            mean = torch.tensor(self.mean, device=out.device).view(shape)
            std = torch.tensor(self.std, device=out.device).view(shape)
            out = (out - mean) / std
        return out


def read_image(path: Path | BinaryIO, channels: int) -> np.ndarray:
    """An image file as uint8 [H, W, channels], converting 16-bit, 32-bit integer and float images by their
    real range (Pillow's own conversion to 8 bits clips 16-bit images to 255 and floats to 0)."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                values = np.asarray(image, dtype=np.float64)
                array = _high_depth_to_uint8(values, mode, path)[..., None]
                return array.repeat(3, axis=-1) if channels == 3 else array
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
                # Transparent pixels over white, as viewers show them, rather than their hidden colour.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            converted = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(converted, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{path} is not a readable image ({error}); remove it or replace it") from error
    return array[..., None] if channels == 1 else array


def _high_depth_to_uint8(values: np.ndarray, mode: str, path: Path | BinaryIO) -> np.ndarray:
    """16-bit images scale by 65535 -> 255; float images must hold [0, 1] or [0, 255]."""
    if not np.isfinite(values).all():
        raise InputError(f"{path} holds NaN or infinite pixel values; fix or remove the image")
    if mode == "F":
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            raise InputError(f"{path} is a float image with values in [{low:g}, {high:g}]; kshot reads float "
                             f"images in [0, 1] or [0, 255]: rescale it")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    high = float(values.max()) if values.size else 0.0
    if values.min() < 0 or high > 65535:
        raise InputError(f"{path} is a 32-bit integer image with values outside 0-65535; convert it to 8 or 16 bits")
    return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)


def check_images(images: Tensor, where: str = "images") -> Tensor:
    """Tensors given directly: refuse NaN/inf and floats outside [0, 1] (0-255 floats are a common mistake)."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise InputError(f"{where} must be uint8 (0-255) or float (0-1) tensors, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise InputError(f"{where} hold NaN or infinite values; fix the images before predicting")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1.0 + 1e-6):
        low, high = float(images.min()), float(images.max())
        hint = "divide them by 255 (or pass uint8)" if high <= 255 and low >= 0 else "rescale them to [0, 1]"
        raise InputError(f"{where} are float tensors with values in [{low:g}, {high:g}], but kshot reads float "
                         f"images in [0, 1]; {hint}")
    return images


def check_decoded_as(expected: InputContract | None, dataset: Any, fix: str) -> Any:
    """`dataset` (a ClassDataset) if it was decoded as a model `expected` (or either has no contract), else a
    one-line InputError naming every field that differs, and `fix`."""
    if expected is not None and dataset.contract is not None and dataset.contract != expected:
        raise InputError(f"{dataset.name} was decoded with {', '.join(expected.differences(dataset.contract))}; "
                         f"{fix}")
    return dataset


def omniglot_contract(image_size: int = 28) -> InputContract:
    """Omniglot as kshot stores it: grey, LANCZOS resize, strokes inverted to light on dark."""
    return InputContract(channels=1, image_size=image_size, resize="lanczos", invert=True)


def contract_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(InputContract)]


def require_contract(contract: InputContract | None, what: str) -> InputContract:
    if contract is None:
        raise ConfigError(f"this model records no input contract (it was trained on tensors, not files), so kshot "
                          f"cannot decode {what} for it; pass uint8 or float tensors shaped like its training "
                          f"images, or give the contract explicitly (contract=kshot.data.InputContract(...))")
    return contract
