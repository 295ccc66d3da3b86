"""The one learner interface that every few-shot algorithm implements, metric-based and gradient-based alike.

A learner is an `nn.Module` that
- computes a training loss on whatever its training stream yields (an `Episode` or meta-batch by default),
- adapts to a support set and returns a `Predictor` that scores queries (logits, or values for regression),
- says how to rebuild itself (`config`), so checkpoints, the CLI and benchmarks can handle any learner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic.dataclasses import dataclass as options_schema
from torch import Tensor, nn

from kshot.backbones import module_spec
from kshot.config import STRICT, as_dict, parse
from kshot.data.dataset import ClassDataset
from kshot.data.sampler import EpisodeSampler
from kshot.episode import Episode

Predictor = Callable[[Tensor], Tensor]
"""Maps query inputs [Q, ...] to logits [Q, N] (classification) or predictions [Q, ...] (regression)."""


@dataclass(frozen=True)
class EpisodeShape:
    """The shape of training tasks: N-way K-shot Q-query, B tasks per meta-batch (1 means single episodes)."""

    ways: int
    shots: int
    queries: int
    meta_batch: int = 1


class EpisodeStream:
    """Training batches drawn from an `EpisodeSampler`: single episodes, or meta-batches when meta_batch > 1."""

    def __init__(self, dataset: ClassDataset, shape: EpisodeShape, seed: int) -> None:
        self.sampler = EpisodeSampler(dataset, shape.ways, shape.shots, shape.queries, seed=seed)
        self.meta_batch = shape.meta_batch

    def __iter__(self) -> Iterator[Episode]:
        return self

    def __next__(self) -> Episode:
        return self.sampler.sample() if self.meta_batch == 1 else self.sampler.sample_batch(self.meta_batch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


@options_schema(config=STRICT)
class NoOptions:
    """The options of a learner that takes none: any option given is an unknown-setting error."""


class Learner(nn.Module, ABC):
    """Base class of every few-shot learner; see the module docstring for the contract."""

    name: ClassVar[str]
    """Registry name, used by recipes and the CLI."""

    Options: ClassVar[type] = NoOptions
    """The learner's options: a pydantic dataclass with `config=STRICT` (a subclass extends its parent's by
    dataclass inheritance). `__init__` validates the options given against it with `kshot.config.parse`, so
    every learner rejects unknown, wrong-typed and out-of-range options with the same one-line `ConfigError`."""

    outer_optimizer: ClassVar[dict[str, Any]] = {"optimizer": "adam"}
    """The outer optimiser used when the training settings leave `optimizer` / `momentum` unset."""

    trains_on_episodes: ClassVar[bool] = True
    """False for learners whose training stream is not N-way episodes (supervised pretraining, pairs)."""

    required_outer_optimizer: ClassVar[dict[str, Any]] = {}
    """Outer optimiser settings this learner cannot train without (a different choice is a config error)."""

    works_on_features: ClassVar[bool] = False
    """True when adapting leaves the backbone unchanged: `adapt` is `embed` followed by `adapt_embedded`, so
    evaluation may embed the images of many episodes in one backbone pass and give each episode its features."""

    transductive: ClassVar[bool] = False
    """True when predictions use the whole query set of a task together (the unlabelled queries inform each
    other's labels): results say so, since such figures are not comparable with inductive ones."""

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_shape = tuple(image_shape)
        self.options: dict[str, Any] = as_dict(parse(self.Options, options, "options"))
        """Every option, defaults included, as plain JSON data, so that `config()` rebuilds the same learner."""

    # ---------------------------------------------------------------------------------------------- training
    def prepare(self, train_dataset: ClassDataset) -> None:
        """Called once with the training set before the optimiser is built (e.g. to size a classifier head).

        Anything set here that is needed to rebuild the learner must be stored in `self.options`.
        """

    def training_stream(self, dataset: ClassDataset, shape: EpisodeShape, seed: int) -> Iterator[Any]:
        """The batches `loss` trains on; episodes of `shape` by default. Must offer state_dict/load_state_dict."""
        return EpisodeStream(dataset, shape, seed)

    @abstractmethod
    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Training loss on one batch of the training stream, and metrics to log (e.g. accuracy)."""

    # ------------------------------------------------------------------------------------------- inference
    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """Fit the support set (labels 0..N-1) and return a predictor for queries of the same task."""

    # ------------------------------------------------------------------- learners that work on fixed features
    def embed(self, images: Tensor) -> Tensor:
        """Features [M, ...] of images [M, C, H, W] as `adapt_embedded` takes them (the backbone's by default)."""
        return self.backbone(images)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        """For `works_on_features` learners: fit support features (labels 0..N-1) and return a predictor that
        maps query features (from `embed`) to logits. A transductive predictor must be given one task's whole
        query set at once."""
        raise NotImplementedError(f"{self.name} adapts its backbone; it has no adapt_embedded")

    def adapt_through_features(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """`adapt` for `works_on_features` learners: embed the support set, fit it, embed queries to predict."""
        head = self.adapt_embedded(self.embed(support_x), support_y)
        return lambda query_x: head(self.embed(query_x))

    # ---------------------------------------------------------------------------------------------- helpers
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this learner (see `kshot.learners.build_learner`)."""
        contract = getattr(self, "input_contract", None)
        return {"learner": self.name, "image_shape": list(self.image_shape),
                "backbone": dict(getattr(self, "backbone_spec", None) or module_spec(self.backbone)),
                "options": dict(self.options), "input_contract": contract.to_dict() if contract else None}

    def outer_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the outer (meta) optimiser updates; all of them unless a learner says otherwise."""
        return self.parameters()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percent (0-100) of rows whose arg-max matches the label: the unit of validation and test accuracy, so
    that training and validation figures share one scale."""
    return 100 * (logits.argmax(dim=-1) == labels).float().mean().item()


def classes_in(support_y: Tensor) -> int:
    """Number of classes N of a support set labelled 0..N-1, checking that every label is present."""
    ways = int(support_y.max().item()) + 1
    if torch.bincount(support_y.flatten(), minlength=ways).min() == 0:
        raise ValueError("support labels must cover 0..N-1 with every class present at least once")
    return ways
