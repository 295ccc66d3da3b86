"""Few-shot learners behind one interface (`Learner`), and a registry to build them by name."""

from __future__ import annotations

from typing import Any

from kshot.backbones import build_backbone
from kshot.learners.base import EpisodeShape, EpisodeStream, Learner, Predictor
from kshot.learners.baseline import Baseline, BaselinePlusPlus
from kshot.learners.maml import ANIL, MAML, MetaSGD
from kshot.learners.matching import MatchingNet
from kshot.learners.protonet import ProtoNet
from kshot.learners.relation import RelationNet
from kshot.learners.reptile import Reptile
from kshot.learners.siamese import SiameseNet
from kshot.learners.simpleshot import SimpleShot

LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in (ProtoNet, MatchingNet, RelationNet,
                                                                  MAML, ANIL, MetaSGD, Reptile, SiameseNet,
                                                                  Baseline, BaselinePlusPlus, SimpleShot)}


def register(cls: type[Learner]) -> type[Learner]:
    """Add a learner class to the registry (usable as a decorator)."""
    LEARNERS[cls.name] = cls
    return cls


def build_learner(learner: str, image_shape: tuple[int, ...], backbone: dict[str, Any] | None = None,
                  options: dict[str, Any] | None = None) -> Learner:
    """A learner by registry name, on a backbone built from `backbone` ({"name": "conv4", ...options})."""
    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; choose one of {', '.join(sorted(LEARNERS))}")
    spec = dict(backbone or {"name": "conv4"})
    options_of_backbone = {k: v for k, v in spec.items() if k != "name"}
    model = build_backbone(spec["name"], tuple(image_shape), **options_of_backbone)
    built = LEARNERS[learner](model, image_shape, **(options or {}))
    built.backbone_spec = spec
    return built


__all__ = ["ANIL", "LEARNERS", "MAML", "EpisodeShape", "EpisodeStream", "Learner", "MetaSGD", "Predictor",
           "ProtoNet", "Reptile", "build_learner", "register"]
