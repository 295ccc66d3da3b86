"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017): four blocks of 3x3 convolution, batch norm,
ReLU and 2x2 max-pool. `hidden` filters a block: 64 (the metric papers) gives 64 features at 28x28 and
64 * 5 * 5 = 1,600 at 84x84; 32 (MAML's miniImageNet network, `{"name": "conv4", "hidden": 32}`) gives 800."""

from __future__ import annotations

from typing import Any

from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, ConfigError, NonNegativeInt, PositiveInt


def conv_block(in_channels: int, out_channels: int, pool: bool = True) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU, 2x2 max-pool: the block of Vinyals, Snell and Finn."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                               nn.BatchNorm2d(out_channels), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four conv blocks of `hidden` filters; 28x28 input gives 64 features, 84x84 gives 1,600.

    `flatten=False` keeps the final feature map (for learners such as Relation Networks that need it), and
    `pooled_blocks` < depth leaves the last blocks unpooled, as Sung et al.'s relation encoder does (28x28 -> 7x7).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, depth: int = 4, flatten: bool = True,
                 pooled_blocks: int | None = None) -> None:
        super().__init__()
        pooled = depth if pooled_blocks is None else pooled_blocks
        if not 0 <= pooled <= depth:
            raise ValueError(f"pooled_blocks must be between 0 and depth ({depth}), got {pooled_blocks}")
        channels = [in_channels] + [hidden] * depth
        self.encoder = nn.Sequential(*(conv_block(a, b, pool=i < pooled)
                                       for i, (a, b) in enumerate(zip(channels[:-1], channels[1:]))))
        self.flatten = flatten
        self.out_channels = hidden

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        return features.flatten(1) if self.flatten else features


@dataclass(config=STRICT)
class Conv4Options:
    """Conv-4: `hidden` filters per block, `depth` blocks, flattened features unless `flatten` is false,
    the first `pooled_blocks` blocks pooled (all when unset)."""

    hidden: PositiveInt = 64
    depth: PositiveInt = 4
    flatten: bool = True
    pooled_blocks: NonNegativeInt | None = None


def conv4_for(image_shape: tuple[int, ...], **options: Any) -> Conv4:
    """A Conv-4 for images of `image_shape`, refusing images too small for its pooling (a clear error instead of
    torch's "output size is too small" at the first forward pass)."""
    depth = options.get("depth", 4)
    pooled = options.get("pooled_blocks")
    pooled = depth if pooled is None else pooled
    smallest = min(image_shape[1:]) if len(image_shape) == 3 else 0
    if len(image_shape) == 3 and smallest < 2 ** pooled:
        raise ConfigError(f"backbone: conv4 with {pooled} pooled blocks needs images of at least {2 ** pooled}x"
                          f"{2 ** pooled}, got {image_shape[1]}x{image_shape[2]}; use larger images "
                          f"(dataset.image_size) or fewer pooled blocks (backbone.pooled_blocks)")
    return Conv4(in_channels=image_shape[0], **options)
