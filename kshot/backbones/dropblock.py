"""DropBlock (Ghiasi, Lin and Le, 2018): dropout of contiguous block_size x block_size squares of a feature map,
which regularises convolutional features better than dropping single units (neighbours are correlated).

As in the ResNet-12 code of MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020): seeds are drawn only where
a whole block fits, with rate gamma = rate / block_size^2 * H W / ((H - block_size + 1)(W - block_size + 1)), so
that about `rate` of the units are dropped, and the kept units are rescaled by (all units / kept units).

Functional-friendly: the mask comes from `torch.bernoulli` on the global generator (deterministic given the torch
seed) and nothing is written in place unless a ramp is asked for, so it runs under `torch.func.functional_call`,
`torch.func.grad` and `vmap` (randomness="different") and in MAML's second-order inner loop like any other layer.
With a ramp its counter is updated in place, as batch norm's num_batches_tracked is: fine in MAML's "loop" strategy
(autograd), refused by `torch.func.grad`, like batch norm in training mode. In eval mode it is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropBlock(nn.Module):
    """Drop blocks of `block_size` (clipped to the map size) with probability `rate` per unit in training.

    `ramp` > 0 raises the rate linearly from 0 to `rate` over the first `ramp` training-mode forward passes, as
    the references do (their keep probability falls from 1 to 1 - rate over 40,000 forward passes); the count is
    a buffer (`seen`), so it is saved with checkpoints and resumes. `ramp` = 0 uses `rate` from the start.
    """

    def __init__(self, rate: float, block_size: int, ramp: int = 0) -> None:
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"DropBlock rate must be in [0, 1), got {rate}")
        self.rate, self.block_size, self.ramp = float(rate), int(block_size), int(ramp)
        if self.ramp:
            self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def current_rate(self) -> float:
        """The drop rate of the next training forward pass."""
        if not self.ramp:
            return self.rate
        return self.rate * min(1.0, (int(self.seen) + 1) / self.ramp)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0:
            return x
        rate = self.current_rate()
        if self.ramp:
            with torch.no_grad():
                self.seen += 1
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        seeds_h, seeds_w = height - size + 1, width - size + 1
        gamma = min(1.0, rate / size**2 * height * width / (seeds_h * seeds_w))
        seeds = torch.bernoulli(torch.full((*x.shape[:-2], seeds_h, seeds_w), gamma, dtype=x.dtype, device=x.device))
        # A seed at (i, j) drops rows i..i+size-1 and columns j..j+size-1 of the map: a max over the seeds padded
        # by size - 1 on every side gives exactly that, at the map's size.
        dropped = F.max_pool2d(F.pad(seeds, [size - 1] * 4), kernel_size=size, stride=1)
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1))

    def extra_repr(self) -> str:
        return f"rate={self.rate}, block_size={self.block_size}, ramp={self.ramp}"
