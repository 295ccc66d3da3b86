"""Wide residual networks (Zagoruyko and Komodakis, 2016), WRN-28-10 by default: the backbone of LEO (Rusu et al.
2019) and S2M2 (Mangla et al. 2020) for miniImageNet.

A 3x3 conv to 16 channels, then three groups of (depth - 4) / 6 pre-activation blocks (batch norm - ReLU - 3x3
conv - batch norm - ReLU - dropout - 3x3 conv, plus the input, or a 1x1 conv of the pre-activated input where the
shape changes) of 16k, 32k and 64k channels (k = widen_factor) with strides 1, 2, 2, a final batch norm - ReLU and
global average pooling: 640 features for WRN-28-10 (36,472,784 parameters), maps of 21x21 before pooling at 84x84.
Layer order as in the authors' code and S2M2's wrn_mixup_model.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from kshot.backbones.resnet12 import DropRate, conv3x3
from kshot.config import STRICT, PositiveInt


class WideBlock(nn.Module):
    """A pre-activation basic block with dropout between its two convolutions."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.preactivate = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU())
        self.body = nn.Sequential(conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU(),
                                  nn.Dropout(dropout) if dropout else nn.Identity(),
                                  conv3x3(out_channels, out_channels))
        reshape = in_channels != out_channels or stride != 1
        self.shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
                         if reshape else None)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.preactivate(x)
        residual = x if self.shortcut is None else self.shortcut(activated)
        return self.body(activated) + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor (see the module docstring); `flatten=False` keeps [C, 1, 1] maps (or [C, H, W]
    without `avg_pool`)."""

    def __init__(self, in_channels: int = 3, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0,
                 avg_pool: bool = True, flatten: bool = True) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"a wide ResNet's depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: list[nn.Module] = [conv3x3(in_channels, widths[0])]
        for group, stride in enumerate((1, 2, 2)):
            for index in range(per_group):
                layers.append(WideBlock(widths[group] if index == 0 else widths[group + 1], widths[group + 1],
                                        stride if index == 0 else 1, dropout))
        layers += [nn.BatchNorm2d(widths[-1]), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.avg_pool, self.flatten = avg_pool, flatten
        self.out_channels = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        features = self.layers(x)
        if self.avg_pool:
            features = features.mean(dim=(-2, -1), keepdim=True)
        return features.flatten(1) if self.flatten else features


@dataclass(config=STRICT)
class WideResNetOptions:
    """Wide ResNet: `depth` (6n + 4: 28 gives four blocks a group), `widen_factor` (10: 640 features), `dropout`
    between each block's convolutions (0 by default; Zagoruyko and Komodakis used 0.3 on CIFAR, S2M2's code
    defaults to 0.5), `avg_pool`, `flatten` as for resnet12."""

    depth: PositiveInt = 28
    widen_factor: PositiveInt = 10
    dropout: DropRate = 0.0
    avg_pool: bool = True
    flatten: bool = True

    @field_validator("depth")
    @classmethod
    def six_n_plus_4(cls, value: int) -> int:
        if (value - 4) % 6 or value < 10:
            raise PydanticCustomError("six_n_plus_4", "input should be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40)")
        return value


def wrn_for(image_shape: tuple[int, ...], **options: Any) -> WideResNet:
    """A wide ResNet for images of `image_shape` (C, H, W)."""
    return WideResNet(in_channels=image_shape[0], **options)
