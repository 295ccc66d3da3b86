"""Recipe files: one YAML per paper setting (learner, backbone, dataset, training, evaluation), with overrides.

Every section is checked against its schema when the recipe is read (`kshot.config`): unknown keys, wrong
types and out-of-range values are one-line errors before anything trains or is deleted. Whether the data can
provide the episodes asked for is checked by `kshot.pipeline.check_recipe_against_data`.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic.dataclasses import dataclass as schema

from kshot.backbones import parse_backbone_spec
from kshot.config import (
    STRICT,
    BnMode,
    ConfigError,
    EvalSetting,
    TrainConfig,
    as_dict,
    parse,
    parse_yaml,
    unknown_key_message,
)
from kshot.data.augment import parse_augment_spec
from kshot.data.registry import parse_dataset_spec
from kshot.learners import learner_class
from kshot.training.optim import optimizer_settings

__all__ = ["EvalSetting", "Recipe", "RecipeError", "apply_overrides", "load_recipe", "recipe_names"]


class RecipeError(ConfigError):
    """A recipe that cannot be found, read or checked."""


@schema(config=STRICT)
class Splits:
    """Which dataset split trains, validates (None: no validation) and tests."""

    train: str = "train"
    val: str | None = "val"
    test: str = "test"


@schema(config=STRICT)
class RecipeText:
    """The free-text and scalar fields of a recipe."""

    bn_mode: BnMode = "inference"
    reference: str = ""
    description: str = ""


@dataclass
class Recipe:
    """What to train and how to evaluate it; see kshot/recipes/*.yaml for examples. Built by `from_dict`,
    which checks every section; the sections stay plain data (dicts, dataclasses) for JSON records."""

    name: str
    learner: str
    dataset: dict[str, Any]
    train: TrainConfig
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "conv4"})
    options: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, Any] = field(default_factory=lambda: as_dict(Splits()))
    evaluate: list[EvalSetting] = field(default_factory=list)
    augment: dict[str, Any] | None = None
    """Training augmentation (`kshot.data.augment.AugmentConfig`), e.g. {crop: {kind: random_resized}, flip: 0.5,
    jitter: {}}; None: none. Applied to training batches only, never to validation or test episodes."""
    bn_mode: Literal["inference", "transductive"] = "inference"
    reference: str = ""
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> Recipe:
        """A checked recipe from plain data (a parsed YAML file, or a checkpoint's record)."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"recipe {name!r} must be a mapping of sections, got {type(data).__name__}")
        data = copy.deepcopy(dict(data))
        known = list(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise RecipeError(unknown_key_message("", str(key), known).replace("unknown setting",
                                                                                    "unknown recipe section"))
        for required in ("learner", "dataset"):
            if required not in data:
                raise RecipeError(f"recipe {name or data.get('name')!r} lacks the required section {required!r}")
        try:
            learner = learner_class(data["learner"])
            options = as_dict(parse(learner.Options, data.get("options"), "options")) \
                if hasattr(learner, "Options") else dict(data.get("options") or {})
            train = TrainConfig.from_dict(data.get("train"))
            optimizer_settings(train, learner)
            evaluate = data.get("evaluate") or []
            if not isinstance(evaluate, list):
                raise ConfigError("evaluate: must be a list of settings, e.g. [{ways: 5, shots: 1}]")
            text = parse(RecipeText, {k: data[k] for k in ("bn_mode", "reference", "description") if k in data},
                         "")
            return cls(name=str(data.get("name") or name or "recipe"), learner=learner.name,
                       dataset=parse_dataset_spec(data["dataset"]), train=train,
                       backbone=parse_backbone_spec(data.get("backbone")), options=options,
                       splits=as_dict(parse(Splits, data.get("splits"), "splits")),
                       evaluate=[parse(EvalSetting, s, f"evaluate[{i}]") for i, s in enumerate(evaluate)],
                       augment=parse_augment_spec(data.get("augment")),
                       bn_mode=text.bn_mode, reference=text.reference, description=text.description)
        except RecipeError:
            raise
        except ConfigError as error:
            raise RecipeError(str(error)) from None

    def to_dict(self) -> dict[str, Any]:
        return as_dict(asdict(self))


def recipe_names() -> list[str]:
    """Names of the recipes that ship with kshot."""
    folder = resources.files("kshot.recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise RecipeError(f"--set {key}=...: the key must look like section.setting, e.g. train.steps")
    node = data
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}=...: {'.'.join(parts[:depth + 1])} is a value, not a section")
    node[parts[-1]] = value


def read_recipe_data(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw data of a shipped recipe (by name) or a YAML file (by path), and its name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        text, name = path.read_text(), path.stem
    else:
        resource = resources.files("kshot.recipes") / f"{name_or_path}.yaml"
        if not resource.is_file():
            close = difflib.get_close_matches(str(name_or_path), recipe_names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"no recipe named {name_or_path!r}; {hint}`kshot recipes` lists the shipped ones, or "
                              f"give the path of a .yaml file")
        text, name = resource.read_text(), str(name_or_path)
    try:
        data = parse_yaml(text) or {}
    except Exception as error:  # yaml.YAMLError, with its line and column
        raise RecipeError(f"recipe {name!r} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {name!r} must be a mapping of sections (learner:, dataset:, train: ...)")
    return data, name


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A shipped recipe by name, or a YAML file by path, with "a.b=value" overrides (values read as YAML 1.2),
    checked in full."""
    data, name = read_recipe_data(name_or_path)
    return Recipe.from_dict(apply_overrides(data, overrides or []), name=name)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of recipe `data` with "a.b=value" overrides applied (values read as YAML 1.2: 1e-4 is a float).
    `dataset=...` replaces the whole dataset section (as `--data` does)."""
    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"--set {override!r} must look like key=value, e.g. --set train.steps=500")
        key, raw = override.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except Exception as error:
            raise RecipeError(f"--set {key}: cannot read {raw!r} as a value ({' '.join(str(error).split())})") \
                from error
        _set_dotted(data, key.strip(), value)
    return data


def overridden_keys(overrides: list[str]) -> set[str]:
    """The dotted keys that overrides set, e.g. {"train.ways"}."""
    return {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
