"""The backbone registry: names -> (options schema, factory), so that recipes, the API and checkpoints build any
backbone from a spec ({"name": ..., options}), a user's own included (by registered name or import path)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from kshot.config import STRICT, ConfigError, as_dict, parse

BackboneFactory = Callable[..., nn.Module]
"""factory(image_shape, **options) -> nn.Module, image_shape being (C, H, W)."""

BACKBONES: dict[str, tuple[type | None, BackboneFactory]] = {}
"""Registered backbones: name -> (options schema or None, factory); kshot's own are added by the package."""


@dataclass(config=STRICT)
class ImportOptions:
    """A user's backbone rebuilt from an import path: `target` is "package.module:callable", called with
    `kwargs` (and `image_shape=(C, H, W)` if it accepts that argument); it must return an nn.Module."""

    target: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


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
