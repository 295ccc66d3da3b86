"""Few-shot learners behind one interface (`Learner`), and a registry to build them by name."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from kshot.backbones import build_backbone, module_spec, parse_backbone_spec
from kshot.config import ConfigError
from kshot.learners.base import EpisodeShape, EpisodeStream, Learner, Predictor
from kshot.learners.baseline import Baseline, BaselinePlusPlus
from kshot.learners.feat import FEAT
from kshot.learners.hallucination import ProtoNetHallucination
from kshot.learners.maml import ANIL, MAML, MetaSGD
from kshot.learners.matching import MatchingNet
from kshot.learners.metaoptnet import MetaOptNet
from kshot.learners.protonet import ProtoNet
from kshot.learners.r2d2 import R2D2
from kshot.learners.relation import RelationNet
from kshot.learners.reptile import Reptile
from kshot.learners.siamese import SiameseNet
from kshot.learners.simpleshot import SimpleShot
from kshot.learners.transductive import BDCSPN, PTMAP, TIM, LaplacianShot
from kshot.learners.versa import Versa

LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in (ProtoNet, MatchingNet, RelationNet,
                                                                  MAML, ANIL, MetaSGD, Reptile, SiameseNet,
                                                                  Baseline, BaselinePlusPlus, SimpleShot, R2D2,
                                                                  Versa, ProtoNetHallucination, FEAT,
                                                                  MetaOptNet, TIM, BDCSPN, PTMAP, LaplacianShot)}


def register(cls: type[Learner]) -> type[Learner]:
    """Add a learner class to the registry (usable as a decorator)."""
    LEARNERS[cls.name] = cls
    return cls


def learner_class(name: str) -> type[Learner]:
    """The learner class registered as `name`, with a one-line error naming the choices."""
    if name not in LEARNERS:
        close = difflib.get_close_matches(str(name), LEARNERS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"learner: unknown learner {name!r}; {hint}choose one of {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name]


def build_learner(learner: str, image_shape: tuple[int, ...], backbone: str | dict[str, Any] | nn.Module | None = None,
                  options: dict[str, Any] | None = None, input_contract: dict[str, Any] | None = None) -> Learner:
    """A learner by registry name, on a backbone built from its spec ({"name": "conv4", ...options}) or given
    as a module; `input_contract` (a dict, as checkpoints store it) says how files become its input."""
    cls = learner_class(learner)
    if isinstance(backbone, nn.Module):
        model, spec = backbone, module_spec(backbone)
    else:
        spec = parse_backbone_spec(backbone)
        model = build_backbone(spec, tuple(image_shape))
    built = cls(model, image_shape, **(options or {}))
    built.backbone_spec = spec
    if input_contract is not None:
        from kshot.data.contract import InputContract

        built.input_contract = InputContract.from_dict(input_contract)
    return built


__all__ = ["ANIL", "LEARNERS", "MAML", "EpisodeShape", "EpisodeStream", "Learner", "MetaSGD", "Predictor",
           "ProtoNet", "Reptile", "build_learner", "learner_class", "register"]
