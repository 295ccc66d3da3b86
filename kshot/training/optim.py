"""The outer (meta) optimiser and its learning-rate schedule, built from the training settings and from what
the learner says it needs (`Learner.outer_optimizer`: Reptile's update is plain SGD on its surrogate loss)."""

from __future__ import annotations

import math

import torch

from kshot.config import ConfigError, TrainConfig
from kshot.learners.base import Learner


def optimizer_settings(config: TrainConfig, learner: type[Learner] | Learner) -> tuple[str, float]:
    """The optimiser name and momentum to use: the config's where set, else the learner's declared choice;
    a choice the learner cannot train with is a `ConfigError`."""
    declared = dict(learner.outer_optimizer)
    name = config.optimizer or declared.get("optimizer", "adam")
    momentum = config.momentum if config.momentum is not None else declared.get("momentum", 0.9)
    required = dict(getattr(learner, "required_outer_optimizer", {}) or {})
    if "optimizer" in required and name != required["optimizer"]:
        raise ConfigError(f"train.optimizer: {learner.name} needs {required['optimizer']!r} (got {name!r}); "
                          f"leave train.optimizer unset to use it")
    if "momentum" in required and name == "sgd" and momentum != required["momentum"]:
        raise ConfigError(f"train.momentum: {learner.name} needs momentum {required['momentum']} (got "
                          f"{momentum}); leave train.momentum unset")
    return name, float(momentum)


def build_optimizer(config: TrainConfig, learner: Learner) -> torch.optim.Optimizer:
    """The outer optimiser over the learner's `outer_parameters` that require gradients."""
    name, momentum = optimizer_settings(config, learner)
    params = [p for p in learner.outer_parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"the {learner.name} learner has nothing to train (every parameter is frozen, as a "
                          f"pretrained backbone is by default); use it without training, or build it with "
                          f"backbone={{'name': ..., 'trainable': true}} to fine-tune")
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule (see `TrainConfig`): "step" multiplies the rate by lr_decay every
    lr_decay_every steps (never, if unset); "multistep" at each of lr_milestones; "linear" (Reptile's outer step
    size) and "cosine" anneal it from lr to lr_final over `steps`."""
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_every or 10**12, config.lr_decay)
    if config.lr_schedule == "multistep":
        if not config.lr_milestones:
            raise ConfigError("train.lr_milestones: the multistep schedule needs milestones, e.g. [36000, 48000]")
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted(config.lr_milestones), config.lr_decay)
    final = config.lr_final / config.lr
    steps = max(config.steps, 1)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 + (final - 1) * min(step, steps) / steps)
