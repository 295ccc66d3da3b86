"""Helpers the learners share for reading their options and sizing heads from their backbone's output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def read_options(learner: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`defaults` updated by `options`, with a clear error for an option the learner does not know."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for learner {learner!r}; it takes {sorted(defaults)}")
    return {**defaults, **options}


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
