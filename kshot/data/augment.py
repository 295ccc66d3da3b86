"""Training-time augmentation for natural images, batched on the training device.

What RFS (Tian et al. 2020) and FEAT (Ye et al. 2020) train miniImageNet with: a random crop (a random resized
crop of scale (0.08, 1), or RFS's 84x84 crop of the image padded by 8 black pixels), a horizontal flip and
colour jitter. Every image of a batch gets its own draw, but the whole batch goes through one `grid_sample`
(crop and flip together) and a few elementwise ops (jitter): no Python loop over images.

The random parameters come from a CPU `torch.Generator`, a fixed number of uniforms per image, so a seed gives
the same augmentation on any device, and the generator's state (a uint8 tensor) resumes the stream exactly.

Augmentation acts in [0, 1] pixel space: float images normalised with an input contract's mean/std are
un-normalised first and normalised again afterwards, so that jitter and black padding act on real colours.
The Trainer applies it to training batches only; evaluation and prediction never augment (a model's
checkpoint.json records it as `train_augmentation`, beside its input contract, for information only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from kshot.config import STRICT, ConfigError, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, as_dict, parse
from kshot.episode import Episode

GREY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601 luma, as torchvision's rgb_to_grayscale uses."""

DRAWS_PER_IMAGE = 9
"""Uniforms drawn per image, whatever is switched on: area, log-ratio, x, y, flip, brightness, contrast,
saturation, hue. A fixed count keeps the stream aligned with the number of images seen."""

AUGMENT_STREAM = 2
"""Mixed into the training seed, so augmentation draws are independent of the episode and batch streams
(which use the seed itself) and of validation (seed + 1)."""


@dataclass(config=STRICT)
class CropConfig:
    """`random_resized`: a box of a fraction `scale` of the image's area and aspect ratio in `ratio`
    (log-uniform), clipped to the image, resized back to the image size (bilinear). `pad`: RFS's
    RandomCrop(size, padding): the image padded by `padding` black pixels each side, cropped back to its size at a
    uniformly drawn whole-pixel offset."""

    kind: Literal["random_resized", "pad"] = "random_resized"
    scale: tuple[Annotated[float, Field(gt=0, le=1)], Fraction] = (0.08, 1.0)
    ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)
    padding: NonNegativeInt = 8

    def __post_init__(self) -> None:
        for name in ("scale", "ratio"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {[low, high]}")


@dataclass(config=STRICT)
class JitterConfig:
    """Colour jitter as torchvision's ColorJitter draws it: factors uniform in [max(0, 1 - x), 1 + x] for
    brightness, contrast and saturation, a hue shift uniform in [-hue, hue] turns; applied in that fixed order
    (torchvision shuffles the order per call). Saturation and hue leave grey images unchanged."""

    brightness: NonNegativeFloat = 0.4
    contrast: NonNegativeFloat = 0.4
    saturation: NonNegativeFloat = 0.4
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0


@dataclass(config=STRICT)
class AugmentConfig:
    """Training augmentation: `crop` (None: none), horizontal `flip` probability (0: never; 0.5 is the usual),
    colour `jitter` (None: none). Everything is off by default; RFS/FEAT's miniImageNet setting is
    {crop: {kind: random_resized}, flip: 0.5, jitter: {}}."""

    crop: CropConfig | None = None
    flip: Fraction = 0.0
    jitter: JitterConfig | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | AugmentConfig | None, where: str = "augment") -> AugmentConfig:
        return parse(cls, values, where)

    @property
    def is_identity(self) -> bool:
        return self.crop is None and self.flip == 0 and self.jitter is None


def parse_augment_spec(values: Mapping[str, Any] | AugmentConfig | None, where: str = "augment"
                       ) -> dict[str, Any] | None:
    """A recipe's `augment` section checked against `AugmentConfig`, as plain data (None when absent)."""
    return None if values is None else as_dict(AugmentConfig.from_dict(values, where))


def augment_seed(seed: int) -> int:
    """The augmentation generator's seed for a training seed: a SeedSequence mix, so that it shares no draws
    with the streams seeded by `seed` itself."""
    entropy = (seed % 2**64, AUGMENT_STREAM)
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class BatchAugmenter:
    """Augments images [..., C, H, W] (uint8, or float in [0, 1] or normalised by `mean`/`std`) and training
    batches holding them, each image with its own random draw.

    `mean`/`std` are the input contract's normalisation: float images are un-normalised before and normalised
    again after augmenting (uint8 images are never normalised and are returned as uint8)."""

    def __init__(self, config: AugmentConfig | Mapping[str, Any], seed: int = 0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.config = AugmentConfig.from_dict(config)
        self.generator = torch.Generator().manual_seed(augment_seed(seed))
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    # --------------------------------------------------------------------------------------------- state
    def get_state(self) -> Tensor:
        """The generator's state, a uint8 tensor (safe for `torch.load(weights_only=True)`)."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    # --------------------------------------------------------------------------------------------- batches
    def __call__(self, batch: Any) -> Any:
        """A training batch with its images augmented: an `Episode` (support_x and query_x, single or
        meta-batch), or a tuple/list/dict whose image tensors (at least 4 dimensions, [..., C, H, W]) are
        augmented and whose other items (labels, targets) pass through. A batch without images is an error."""
        found: list[bool] = []
        out = self._walk(batch, found)
        if not found:
            raise ConfigError(f"augment: this learner's training batches ({type(batch).__name__}) hold no images "
                              f"[..., channels, height, width] to augment; remove the augment section")
        return out

    def _walk(self, batch: Any, found: list[bool]) -> Any:
        if isinstance(batch, Episode):
            if batch.support_x.dim() < 4:
                return batch
            found.append(True)
            return dataclasses.replace(batch, support_x=self.images(batch.support_x),
                                       query_x=self.images(batch.query_x))
        if isinstance(batch, Tensor):
            if batch.dim() >= 4 and (batch.is_floating_point() or batch.dtype == torch.uint8):
                found.append(True)
                return self.images(batch)
            return batch
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._walk(item, found) for item in batch)
        if isinstance(batch, dict):
            return {key: self._walk(value, found) for key, value in batch.items()}
        return batch

    # --------------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def images(self, images: Tensor) -> Tensor:
        """`images` [..., C, H, W] augmented, same shape and dtype; each image drawn independently."""
        config = self.config
        if config.is_identity or images.numel() == 0:
            return images
        shape, dtype = images.shape, images.dtype
        x = images.reshape(-1, *shape[-3:])
        draws = torch.rand(len(x), DRAWS_PER_IMAGE, generator=self.generator).to(x.device, non_blocking=True)
        normalised = self.mean is not None and dtype != torch.uint8
        if dtype == torch.uint8:
            x = x.float().mul_(1.0 / 255.0)
        elif normalised:  # back to [0, 1] pixels
            x = torch.addcmul(self.mean.to(x.device), x.float(), self.std.to(x.device))
        else:
            x = x.float()
        flip = draws[:, 4] < config.flip
        if config.crop is not None:
            x = crop(x, config.crop, draws[:, :4], flip)
        elif config.flip > 0:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if config.jitter is not None:
            x = jitter(x, config.jitter, draws[:, 5:])
        if dtype == torch.uint8:
            x = (x * 255.0).round_().clamp_(0, 255)
        elif normalised:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(dtype).reshape(shape)


def crop(x: Tensor, config: CropConfig, draws: Tensor, flip: Tensor) -> Tensor:
    """Random crops of x [n, C, H, W] in [0, 1], mirrored where `flip` [n] is true, as one grid_sample.

    draws [n, 4] are uniforms: area and log aspect ratio (random_resized), then the box's x and y position. The
    crop is axis-aligned, so its sampling grid is built separably (per-image scale and offset of one row and
    one column of pixel centres), which is several times faster on CPU than `affine_grid`'s batched matmul."""
    n, _, height, width = x.shape
    if config.kind == "random_resized":
        low, high = config.scale
        area = low + draws[:, 0] * (high - low)
        log_low, log_high = math.log(config.ratio[0]), math.log(config.ratio[1])
        ratio = torch.exp(log_low + draws[:, 1] * (log_high - log_low))
        box_w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the width and height
        box_h = (area / ratio).sqrt().clamp(max=1.0)
        # Box centre in grid coordinates ([-1, 1]), drawn so that the box stays inside the image.
        centre_x, centre_y = (2 * draws[:, 2] - 1) * (1 - box_w), (2 * draws[:, 3] - 1) * (1 - box_h)
        mode, padding_mode = "bilinear", "border"
    else:
        pad = config.padding
        shift_x = (draws[:, 2] * (2 * pad + 1)).floor().clamp(max=2 * pad) - pad  # whole pixels in [-pad, pad]
        shift_y = (draws[:, 3] * (2 * pad + 1)).floor().clamp(max=2 * pad) - pad
        box_w = box_h = torch.ones(n, device=x.device)
        centre_x, centre_y = 2 * shift_x / width, 2 * shift_y / height
        mode, padding_mode = "nearest", "zeros"  # whole-pixel shifts: nearest is exact; outside is black
    box_w = torch.where(flip, -box_w, box_w)
    columns = (torch.arange(width, device=x.device) * 2 + 1) / width - 1  # pixel centres, align_corners=False
    rows = (torch.arange(height, device=x.device) * 2 + 1) / height - 1
    grid_x = (box_w[:, None] * columns + centre_x[:, None])[:, None, :].expand(n, height, width)
    grid_y = (box_h[:, None] * rows + centre_y[:, None])[:, :, None].expand(n, height, width)
    grid = torch.stack((grid_x, grid_y), dim=-1)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def jitter(x: Tensor, config: JitterConfig, draws: Tensor) -> Tensor:
    """Colour jitter of x [n, C, H, W] in [0, 1]; draws [n, 4] are uniforms for brightness, contrast,
    saturation and hue. Each step clamps to [0, 1], as torchvision's does; blends are one `lerp` each."""
    def factor(strength: float, u: Tensor) -> Tensor:
        low = max(0.0, 1.0 - strength)
        return (low + u * (1.0 + strength - low)).view(-1, 1, 1, 1)

    colour = x.shape[1] == 3
    if config.brightness > 0:
        x = (x * factor(config.brightness, draws[:, 0])).clamp_(0, 1)
    if config.contrast > 0:
        # The mean luma of an image is the luma of its channel means.
        means = x.mean(dim=(-2, -1))
        mean = means @ x.new_tensor(GREY_WEIGHTS) if colour else means[:, 0]
        x = torch.lerp(x, mean.view(-1, 1, 1, 1), 1 - factor(config.contrast, draws[:, 1])).clamp_(0, 1)
    if colour and config.saturation > 0:
        x = torch.lerp(x, grey(x), 1 - factor(config.saturation, draws[:, 2])).clamp_(0, 1)
    if colour and config.hue > 0:
        x = shift_hue(x, (2 * draws[:, 3] - 1) * config.hue)
    return x


def grey(x: Tensor) -> Tensor:
    """Luma of RGB images x [n, 3, H, W]: [n, 1, H, W] (one matmul over the channels)."""
    n, _, height, width = x.shape
    return (x.new_tensor(GREY_WEIGHTS) @ x.reshape(n, 3, -1)).view(n, 1, height, width)


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """RGB images x [n, 3, H, W] in [0, 1] with their hue rotated by `shift` [n] turns (through HSV)."""
    value, _ = x.max(dim=1)
    delta = value - x.min(dim=1).values
    r, g, b = x.unbind(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1.0
    saturation = delta / torch.where(value > 0, value, torch.ones_like(value))
    # HSV -> RGB: channel = v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B.
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * hue.unsqueeze(1)) % 6
    chroma = (value * saturation).unsqueeze(1)
    return value.unsqueeze(1) - chroma * torch.minimum(k, 4 - k).clamp(0, 1)
