"""Feature extractors shared by every learner: the standard Conv-4 and an MLP."""

from __future__ import annotations

from torch import Tensor, nn


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


class MLP(nn.Module):
    """Fully connected layers with ReLU between them; flattens image input."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256, 128, 64), out_features: int | None = None,
                 batch_norm: bool = False) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers.append(nn.Linear(a, b))
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
        if out_features is not None:
            layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)
        self.out_features = out_features if out_features is not None else sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


BACKBONES = ("conv4", "mlp")


def build_backbone(name: str, image_shape: tuple[int, int, int], **options) -> nn.Module:
    """A backbone by name for images of `image_shape` (C, H, W)."""
    if name == "conv4":
        return Conv4(in_channels=image_shape[0], **options)
    if name == "mlp":
        in_features = image_shape[0] * image_shape[1] * image_shape[2]
        hidden = tuple(options.pop("hidden", (256, 128, 64)))
        return MLP(in_features, hidden=hidden, **options)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
