"""Helpers the learners share: integer option types and sizing heads from their backbone's output."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Strict
from torch import nn

from kshot.config import NonNegativeInt, PositiveInt

Count = Annotated[NonNegativeInt, Strict()]
"""An integer >= 0 in a learner's `Options`. Strict, unlike kshot.config's lax ints: `true`, `2.0` or "2" is
an error, not a count (options come from YAML 1.2, JSON or Python, which all give real integers)."""

PositiveCount = Annotated[PositiveInt, Strict()]
"""An integer >= 1 in a learner's `Options`, strict as `Count` is."""


def backbone_output_shape(backbone: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the backbone's output for one image (no batch dimension), from a dummy forward pass."""
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        with torch.no_grad():
            parameter = next(backbone.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            out = backbone(torch.zeros(1, *image_shape, device=device))
    finally:
        for module, training in modes.items():
            module.training = training
    return tuple(out.shape[1:])


def feature_dim(backbone: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Length of the backbone's feature vector for one image; errors if the backbone gives feature maps."""
    shape = backbone_output_shape(backbone, image_shape)
    if len(shape) != 1:
        raise ValueError(f"this learner needs feature vectors but the backbone gives maps of shape {shape}; "
                         f"use a flattening backbone (e.g. conv4 with flatten: true)")
    return shape[0]
