"""ResNet-12 as used by TADAM, MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020) for miniImageNet-sized images.

Four residual blocks, each: three 3x3 conv (no bias) - batch norm - LeakyReLU(0.1) layers (the last one's
activation after the addition), a 1x1 conv - batch norm shortcut, LeakyReLU(0.1) after the sum, 2x2 max-pool,
then dropout (blocks 1-2) or DropBlock (blocks 3-4) at `drop_rate`; this order follows the MetaOptNet and RFS
code (models/ResNet12_embedding.py, models/resnet.py). Widths 64-160-320-640 (12,424,320 parameters); 84x84
input gives 5x5 maps, then global average pooling gives 640 features (RFS; `avg_pool: false` keeps the
640 * 5 * 5 = 16,000 features MetaOptNet used).

Under second-order MAML it needs about 5 GiB a task at 84x84 (5 inner steps, 5-way 1-shot 15-query, measured on
the CPU); see `kshot.backbones.memory`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from kshot.backbones.dropblock import DropBlock
from kshot.config import STRICT, ConfigError, NonNegativeInt, PositiveInt

DropRate = Annotated[float, Field(ge=0, lt=1)]
"""A dropout or DropBlock rate: 0 (off) up to, not including, 1."""


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class ResNet12Block(nn.Module):
    """Three conv-BN-LeakyReLU layers with a 1x1 conv-BN shortcut, max-pool, then `drop` (dropout or DropBlock)."""

    def __init__(self, in_channels: int, out_channels: int, drop: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1),
            conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1),
            conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.activation = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.pool(self.activation(self.body(x) + self.shortcut(x))))


class ResNet12(nn.Module):
    """ResNet-12 (see the module docstring); `flatten=False` keeps maps ([C, 1, 1] with avg_pool, else [C, H, W])."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640), drop_rate: float = 0.1,
                 dropblock_size: int = 5, dropblock_ramp: int = 0, avg_pool: bool = True, flatten: bool = True
                 ) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        blocks = []
        for index, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            if drop_rate == 0:
                drop: nn.Module = nn.Identity()
            elif index >= len(widths) - 2:  # the last two blocks, as in the references
                drop = DropBlock(drop_rate, dropblock_size, dropblock_ramp)
            else:
                drop = nn.Dropout(drop_rate)
            blocks.append(ResNet12Block(a, b, drop))
        self.blocks = nn.Sequential(*blocks)
        self.avg_pool, self.flatten = avg_pool, flatten
        self.out_channels = widths[-1]
        for module in self.modules():  # the references' initialisation (batch norm keeps weight 1, bias 0)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(x)
        if self.avg_pool:
            features = features.mean(dim=(-2, -1), keepdim=True)
        return features.flatten(1) if self.flatten else features


@dataclass(config=STRICT)
class ResNet12Options:
    """ResNet-12: `widths` of the four blocks; `drop_rate`: dropout in blocks 1-2 and DropBlock in blocks 3-4 (0
    turns both off; 0.1 is MetaOptNet's and RFS's miniImageNet setting); `dropblock_size`: block side (5; clipped
    to smaller maps); `dropblock_ramp`: training forward passes over which DropBlock's rate rises from 0 to
    drop_rate (the references used 40,000; 0, the default, means the full rate from the start, because how many
    forward passes a training step makes depends on the learner: MAML makes inner_steps + 1 a task);
    `avg_pool`: global average pooling to widths[-1] features; `flatten`: false keeps feature maps."""

    widths: tuple[PositiveInt, ...] = (64, 160, 320, 640)
    drop_rate: DropRate = 0.1
    dropblock_size: PositiveInt = 5
    dropblock_ramp: NonNegativeInt = 0
    avg_pool: bool = True
    flatten: bool = True

    @field_validator("widths")
    @classmethod
    def four_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) != 4:
            raise PydanticCustomError("four_widths", "input should be four widths, e.g. [64, 160, 320, 640]")
        return value


def resnet12_for(image_shape: tuple[int, ...], **options: Any) -> ResNet12:
    """A ResNet-12 for images of `image_shape` (C, H, W); its four 2x2 max-pools need at least 16x16."""
    if len(image_shape) != 3 or min(image_shape[1:]) < 16:
        raise ConfigError(f"backbone: resnet12 pools four times and needs images (C, H, W) of at least 16x16, got "
                          f"{'x'.join(map(str, image_shape))}; use larger images (dataset.image_size)")
    return ResNet12(in_channels=image_shape[0], **options)
