"""Batch norm at test time, chosen on purpose: inference mode (running statistics) or transductive mode
(statistics of the batch being classified, as the MAML reference code does), without touching saved stats."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

BN_MODES = ("inference", "transductive")


@contextmanager
def batchnorm_mode(module: nn.Module, mode: str) -> Iterator[None]:
    """Put `module` in eval mode; in "transductive" mode batch-norm layers normalise with batch statistics.

    Running statistics are never updated inside the block, and every module's mode is restored after it.
    """
    if mode not in BN_MODES:
        raise ValueError(f"unknown batch-norm mode {mode!r}; choose one of {', '.join(BN_MODES)}")
    modes = {m: m.training for m in module.modules()}
    stashed = []
    module.eval()
    try:
        if mode == "transductive":
            for layer in module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    # num_batches_tracked too: train-mode forward increments it even without running stats.
                    tracked = None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone()
                    stashed.append((layer, layer.running_mean, layer.running_var, tracked))
                    layer.running_mean, layer.running_var = None, None
                    layer.train()
        yield
    finally:
        for layer, mean, var, tracked in stashed:
            layer.running_mean, layer.running_var = mean, var
            if tracked is not None:
                layer.num_batches_tracked.copy_(tracked)
        for m, training in modes.items():
            m.training = training
