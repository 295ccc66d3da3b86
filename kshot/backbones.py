"""Feature extractors shared by every learner (the standard Conv-4 and an MLP), their typed options, and a
registry so that checkpoints rebuild any backbone, a user's own included (by registered name or import path)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from kshot.config import STRICT, ConfigError, NonNegativeInt, PositiveInt, as_dict, parse


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


@dataclass(config=STRICT)
class Conv4Options:
    """Conv-4: `hidden` filters per block, `depth` blocks, flattened features unless `flatten` is false,
    the first `pooled_blocks` blocks pooled (all when unset)."""

    hidden: PositiveInt = 64
    depth: PositiveInt = 4
    flatten: bool = True
    pooled_blocks: NonNegativeInt | None = None


@dataclass(config=STRICT)
class MLPOptions:
    """MLP: hidden layer sizes, an optional output layer, optional batch norm."""

    hidden: tuple[PositiveInt, ...] = (256, 128, 64)
    out_features: PositiveInt | None = None
    batch_norm: bool = False


@dataclass(config=STRICT)
class ImportOptions:
    """A user's backbone rebuilt from an import path: `target` is "package.module:callable", called with
    `kwargs` (and `image_shape=(C, H, W)` if it accepts that argument); it must return an nn.Module."""

    target: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


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


BackboneFactory = Callable[..., nn.Module]
BACKBONES: dict[str, tuple[type, BackboneFactory]] = {
    "conv4": (Conv4Options, lambda shape, **o: conv4_for(shape, **o)),
    "mlp": (MLPOptions, lambda shape, **o: MLP(shape[0] * shape[1] * shape[2], **o)),
}


def register_backbone(name: str, factory: BackboneFactory, options: type | None = None) -> None:
    """Make `factory(image_shape, **options) -> nn.Module` buildable by name in recipes, the API and when a
    checkpoint is loaded; `options` is a schema (a `kshot.config.STRICT` pydantic dataclass) for its options."""
    if name in ("import", "module"):
        raise ValueError(f"{name!r} is reserved; choose another backbone name")
    BACKBONES[name] = (options, factory)


def parse_backbone_spec(spec: str | Mapping[str, Any] | None, where: str = "backbone") -> dict[str, Any]:
    """A backbone section ({"name": ..., options}) checked against its schema, defaults filled in."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {"name": "conv4"})
    name = spec.pop("name", None)
    if name == "import":
        return {"name": "import", **as_dict(parse(ImportOptions, spec, where))}
    if name not in BACKBONES:
        raise ConfigError(f"{where}.name: unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}, "
                          f"register yours with kshot.backbones.register_backbone, or use "
                          f"{{name: import, target: 'package.module:factory'}}")
    schema = BACKBONES[name][0]
    options = as_dict(parse(schema, spec, where)) if schema is not None else spec
    return {"name": name, **options}


def build_backbone(spec: str | Mapping[str, Any], image_shape: tuple[int, int, int]) -> nn.Module:
    """A backbone from its spec for images of `image_shape` (C, H, W)."""
    spec = parse_backbone_spec(spec)
    name = spec.pop("name")
    if name == "import":
        factory = import_target(spec["target"])
        kwargs = dict(spec["kwargs"])
        if "image_shape" in inspect.signature(factory).parameters:
            kwargs["image_shape"] = tuple(image_shape)
        module = factory(**kwargs)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"backbone.target: {spec['target']} returned {type(module).__name__}, not an nn.Module")
        return module
    return BACKBONES[name][1](tuple(image_shape), **spec)


def import_target(target: str) -> Callable[..., Any]:
    """The callable named by "package.module:attribute" (a clear error if it cannot be imported)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"backbone.target: {target!r} must look like 'package.module:factory'")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"backbone.target: cannot import {target!r} ({error}); make the module importable "
                          f"(installed, or on PYTHONPATH)") from error
    if not callable(value):
        raise ConfigError(f"backbone.target: {target!r} is not callable")
    return value


def rebuildable(spec: Mapping[str, Any]) -> bool:
    """Whether a checkpoint with this backbone spec can be loaded again (by registry name or import path)."""
    return spec.get("name") == "import" or spec.get("name") in BACKBONES


def module_spec(module: nn.Module) -> dict[str, Any]:
    """The spec recorded for a backbone given as a module instance: not rebuildable, so saving refuses it with
    a message saying how to make it rebuildable."""
    cls = type(module)
    return {"name": "module", "class": f"{cls.__module__}:{cls.__qualname__}"}


def unrebuildable_message(spec: Mapping[str, Any]) -> str:
    return (f"the backbone was given as an nn.Module instance ({spec.get('class')}), which kshot cannot rebuild "
            f"when loading; register a factory (kshot.backbones.register_backbone('mynet', factory)) and pass "
            f"backbone='mynet', or pass backbone={{'name': 'import', 'target': 'package.module:factory', "
            f"'kwargs': {{...}}}}")
