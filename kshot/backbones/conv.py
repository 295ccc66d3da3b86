"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017): four blocks of 3x3 convolution, batch norm,
ReLU and 2x2 max-pool. `hidden` filters a block: 64 (the metric papers) gives 64 features at 28x28 and
64 * 5 * 5 = 1,600 at 84x84; 32 (MAML's miniImageNet network, `{"name": "conv4", "hidden": 32}`) gives 800.

`channels_last: true` (off by default) makes the blocks compute in channels-last (NHWC) memory layout on the CPU:
each convolution uses a channels-last copy of its weight (a weight with one input channel, as Omniglot's first,
counts as contiguous in both layouts, so only its weight can make the first output channels-last), and batch
norm, max-pool and ReLU follow their input's layout; parameters stay in the usual layout (checkpoints, optimisers
and `torch.func` see ordinary tensors). It pays because PyTorch's NCHW max-pool kernel with indices is slow on
CPU (110 ms against 13 ms channels-last for the first block of a 60-way Omniglot episode, one thread): a ProtoNet
training step on 20- and 60-way Omniglot episodes took 0.6x-0.66x the time (benchmarks/sgemm_fraction.py). It is
not the default because PyTorch's channels-last batch norm on CPU sums in float32 without the pairwise summation
of its NCHW kernel: on a 20-way episode the gradients of the first two blocks came within 3e-2 (largest error
over the largest entry of a parameter's gradient) of float64's, against 2e-5 in NCHW; the losses agree to 1e-6.
Under `torch.func.vmap` (whose clone takes no memory format) and on GPUs the weights are used as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, ConfigError, NonNegativeInt, PositiveInt


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, with `channels_last` set, convolves on the CPU with a channels-last copy of its weight (see
    the module docstring); otherwise nn.Conv2d itself."""

    channels_last = False

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.channels_last and x.device.type == "cpu":
            try:
                weight = weight.clone(memory_format=torch.channels_last)  # clone: restrides even a 1-channel weight
            except RuntimeError:  # under torch.func.vmap, which clones in the given layout only
                pass
        return self._conv_forward(x, weight, self.bias)


def conv_block(in_channels: int, out_channels: int, pool: bool = True, channels_last: bool = False
               ) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU, 2x2 max-pool: the block of Vinyals, Snell and Finn.

    The max-pool runs before the ReLU: the two commute exactly (the largest of four values, then clamped at zero, is
    the largest of the four clamped values, and the gradient reaches the same input, or none when the maximum is not
    positive), so outputs and gradients are bit for bit those of ReLU then pool, with a quarter of the ReLU's work
    (its forward and backward were 5-10% of a ProtoNet step on 28x28 Omniglot: benchmarks/sgemm_fraction.py)."""
    conv = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
    conv.channels_last = channels_last
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.ReLU())


class Conv4(nn.Module):
    """Four conv blocks of `hidden` filters; 28x28 input gives 64 features, 84x84 gives 1,600.

    `flatten=False` keeps the final feature map (for learners such as Relation Networks that need it), and
    `pooled_blocks` < depth leaves the last blocks unpooled, as Sung et al.'s relation encoder does (28x28 -> 7x7).
    `channels_last=True`: compute in channels-last layout on the CPU (faster, less precise batch norm; see the
    module docstring).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, depth: int = 4, flatten: bool = True,
                 pooled_blocks: int | None = None, channels_last: bool = False) -> None:
        super().__init__()
        pooled = depth if pooled_blocks is None else pooled_blocks
        if not 0 <= pooled <= depth:
            raise ValueError(f"pooled_blocks must be between 0 and depth ({depth}), got {pooled_blocks}")
        channels = [in_channels] + [hidden] * depth
        self.encoder = nn.Sequential(*(conv_block(a, b, pool=i < pooled, channels_last=channels_last)
                                       for i, (a, b) in enumerate(zip(channels[:-1], channels[1:]))))
        self.flatten = flatten
        self.out_channels = hidden

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        return features.flatten(1) if self.flatten else features.contiguous()  # maps in the usual layout


@dataclass(config=STRICT)
class Conv4Options:
    """Conv-4: `hidden` filters per block, `depth` blocks, flattened features unless `flatten` is false,
    the first `pooled_blocks` blocks pooled (all when unset), channels-last layout on the CPU if `channels_last`
    (faster training, less precise batch-norm gradients: see kshot/backbones/conv.py)."""

    hidden: PositiveInt = 64
    depth: PositiveInt = 4
    flatten: bool = True
    pooled_blocks: NonNegativeInt | None = None
    channels_last: bool = False


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
