"""A fully connected backbone (the sinusoid regression network of MAML, or any flat-input baseline)."""

from __future__ import annotations

from typing import Any

from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, PositiveInt


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


@dataclass(config=STRICT)
class MLPOptions:
    """MLP: hidden layer sizes, an optional output layer, optional batch norm."""

    hidden: tuple[PositiveInt, ...] = (256, 128, 64)
    out_features: PositiveInt | None = None
    batch_norm: bool = False


def mlp_for(image_shape: tuple[int, ...], **options: Any) -> MLP:
    """An MLP taking images of `image_shape` (C, H, W) flattened."""
    return MLP(image_shape[0] * image_shape[1] * image_shape[2], **options)
