"""Typed configuration: one schema for training and evaluation settings, learner and backbone options and
recipes, and one parser (`parse`) that rejects unknown keys, wrong types and out-of-range values in one line.

Schemas are pydantic dataclasses: they behave as plain dataclasses (`dataclasses.asdict`, attribute access)
and validate whenever they are built. `--set` values and recipe files are read with YAML 1.2 rules
(`parse_yaml`), so `1e-4` is a float and `no` is a string, as a user expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)
"""Every schema: unknown keys are errors, and assignments are validated too."""

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
BnMode = Literal["inference", "transductive"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range; the message is one line that says which
    setting, what was wrong and what is allowed."""


# --------------------------------------------------------------------------------------------------- parsing
def parse(schema: type[T], values: Mapping[str, Any] | T | None, where: str) -> T:
    """`values` validated into `schema` (a pydantic dataclass), or a `ConfigError` naming `where.key`."""
    if isinstance(values, schema):
        return values
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings (key: value), got {type(values).__name__} "
                          f"{values!r}")
    unknown = [key for key in values if key not in field_names(schema)]
    if unknown:
        raise ConfigError(unknown_key_message(where, str(unknown[0]), field_names(schema)))
    try:
        return schema(**values)
    except ValidationError as error:
        raise ConfigError(validation_message(error, where)) from None


def field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def unknown_key_message(where: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    choices = f"known settings are {', '.join(sorted(known))}" if known else "it takes no settings"
    return f"{where + '.' if where else ''}{key}: unknown setting; {hint}{choices}"


def validation_message(error: ValidationError, where: str) -> str:
    """The first problem of a pydantic error as one line: `where.key: what is wrong (got VALUE)`."""
    first = error.errors()[0]
    # pydantic names union members in the location (e.g. "int", "none"); drop those type tags.
    parts = [str(p) for p in first["loc"] if str(p) not in _TYPE_TAGS and not str(p).startswith("function-")]
    location = ".".join([where] * bool(where) + parts)
    message = first["msg"]
    message = message[0].lower() + message[1:] if message else "invalid value"
    got = first.get("input")
    shown = f" (got {got!r})" if not isinstance(got, Mapping) else ""
    return f"{location}: {message}{shown}"


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list[int]", "tuple[int, ...]", "dict[str,any]",
              "literal['adam','sgd']", "lax-or-strict", "is-instance", "chain"}


def as_dict(config: Any) -> dict[str, Any]:
    """A schema instance as plain JSON-friendly data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


# ----------------------------------------------------------------------------------------------- YAML 1.2
class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's scalars: `1e-4` and `.5` are floats, only
    true/false are booleans (`yes`, `no`, `on`, `off` stay strings), and no sexagesimal numbers."""


Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers
          if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 0) if text.startswith("0x") else int(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml(text: str) -> Any:
    """YAML text read with YAML 1.2 core-schema rules (see `Yaml12Loader`)."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


# ------------------------------------------------------------------------------------------------ schemas
@dataclass(config=STRICT)
class TrainConfig:
    """How to train: task shape, optimiser, schedule, validation, checkpoints and budget.

    `optimizer` None means the learner's own choice (`Learner.outer_optimizer`: Adam for most, plain SGD for
    Reptile, whose update is SGD on its surrogate loss); `momentum` None means the optimiser's usual (0.9 for
    SGD, or the learner's). Schedules: "step" multiplies lr by lr_decay every lr_decay_every steps, "multistep"
    at each of lr_milestones (RFS: epochs 60 and 80 of 100), "linear" and "cosine" anneal lr to lr_final over
    `steps`. Checkpoints are written at every validation and, independently, every
    `checkpoint_every` steps and `checkpoint_every_s` seconds (0 turns either off)."""

    ways: PositiveInt = 5
    shots: PositiveInt = 1
    queries: NonNegativeInt = 15
    meta_batch: PositiveInt = 1
    steps: NonNegativeInt = 1000
    optimizer: Literal["adam", "sgd"] | None = None
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] | None = None
    lr_schedule: Literal["step", "multistep", "linear", "cosine"] = "step"
    lr_decay_every: PositiveInt | None = None
    lr_milestones: tuple[PositiveInt, ...] = ()
    lr_decay: Annotated[float, Field(gt=0, le=1)] = 0.5
    lr_final: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat | None = None
    val_every: NonNegativeInt = 500
    val_ways: PositiveInt = 5
    val_shots: PositiveInt | None = None
    val_queries: PositiveInt = 15
    val_episodes: PositiveInt = 200
    val_bn_mode: BnMode = "inference"
    seed: int = 0
    log_every: PositiveInt = 10
    time_budget_s: PositiveFloat | None = None
    checkpoint_every: NonNegativeInt = 0
    checkpoint_every_s: NonNegativeFloat = 300.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, where: str = "train") -> TrainConfig:
        return parse(cls, values, where)


RESUMABLE_CHANGES = ("steps", "time_budget_s", "log_every", "val_every", "val_episodes", "checkpoint_every",
                     "checkpoint_every_s")
"""Training settings a resumed run may change: they say how long and how often, not what is trained."""


@dataclass(config=STRICT)
class EvalSetting:
    """One test-evaluation setting: N-way K-shot Q-query over `episodes` fixed episodes drawn with `seed`."""

    ways: PositiveInt
    shots: PositiveInt
    queries: PositiveInt = 15
    episodes: PositiveInt = 1000
    seed: int = 0
    paper: float | None = None
