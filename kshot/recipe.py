"""Recipe files: one YAML per paper setting (learner, backbone, dataset, training, evaluation), with overrides."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kshot.training.trainer import TrainConfig


class RecipeError(ValueError):
    """A recipe that cannot be found or read."""


@dataclass
class EvalSetting:
    ways: int
    shots: int
    queries: int = 15
    episodes: int = 1000
    seed: int = 0
    paper: float | None = None


@dataclass
class Recipe:
    """What to train and how to evaluate it; see kshot/recipes/*.yaml for examples."""

    name: str
    learner: str
    dataset: dict[str, Any]
    train: TrainConfig
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "conv4"})
    options: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    evaluate: list[EvalSetting] = field(default_factory=list)
    bn_mode: str = "inference"
    reference: str = ""
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str | None = None) -> Recipe:
        data = copy.deepcopy(data)
        for required in ("learner", "dataset"):
            if required not in data:
                raise RecipeError(f"recipe {name or data.get('name')!r} lacks the required key {required!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"recipe {name!r}: unknown keys {unknown}; known keys are {sorted(known)}")
        data.setdefault("name", name or "recipe")
        try:
            data["train"] = TrainConfig.from_dict(data.get("train") or {})
            data["evaluate"] = [EvalSetting(**setting) for setting in data.get("evaluate") or []]
        except (TypeError, ValueError) as error:
            raise RecipeError(f"recipe {data['name']!r}: {error}") from error
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def recipe_names() -> list[str]:
    """Names of the recipes that ship with kshot."""
    folder = resources.files("kshot.recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A shipped recipe by name, or a YAML file by path, with "a.b=value" overrides (values parsed as YAML)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        text, name = path.read_text(), path.stem
    else:
        resource = resources.files("kshot.recipes") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise RecipeError(f"no recipe named {name_or_path!r}; shipped recipes: {', '.join(recipe_names())}")
        text, name = resource.read_text(), str(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {name!r} is not valid YAML: {error}") from error
    return Recipe.from_dict(apply_overrides(data, overrides or []), name=name)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of recipe `data` with "a.b=value" overrides applied (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override {override!r} must look like key=value, e.g. train.steps=500")
        key, raw = override.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data
