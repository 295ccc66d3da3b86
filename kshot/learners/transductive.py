"""Transductive learners: a backbone pretrained by cross-entropy over all base classes (SimpleShot's training,
with its base-class mean feature), then one of the transductive methods of `kshot.transductive` at test time,
which labels a task's queries together. The four papers pretrain their backbones this way.

| learner | method | features it is given (as the paper) |
|---|---|---|
| `tim` | TIM-GD (Boudiaf et al. 2020) | L2-normalised |
| `bd-cspn` | BD-CSPN (Liu, Song and Qin 2020) | L2-normalised |
| `pt-map` | PT-MAP (Hu, Gripon and Pateux 2021) | raw (its own power transform and centring) |
| `laplacianshot` | LaplacianShot (Ziko et al. 2020) | CL2N: centred on the base-class mean, L2-normalised |

`transductive_learner(trained, method)` puts any of them on the backbone of a learner already trained (a
ProtoNet, a SimpleShot, ...): the results of such a learner say they are transductive (`Learner.transductive`
reaches every EvaluationResult), so they are never mistaken for inductive figures.

A transductive predictor must be given a task's whole query set at once: its scores for a query depend on the
other queries (evaluation does this; `FewShotModel.adapt(...).predict(images)` treats the images of one call as
one query set).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from kshot.config import STRICT, ConfigError, NonNegativeFloat, PositiveFloat
from kshot.data.dataset import ClassDataset
from kshot.learners.base import Learner, Predictor, classes_in
from kshot.learners.options import Count, PositiveCount
from kshot.learners.simpleshot import SimpleShot
from kshot.transductive.bd_cspn import DEFAULTS as BD_CSPN_DEFAULTS
from kshot.transductive.bd_cspn import bd_cspn
from kshot.transductive.laplacianshot import DEFAULTS as LAPLACIANSHOT_DEFAULTS
from kshot.transductive.laplacianshot import laplacianshot
from kshot.transductive.pt_map import DEFAULTS as PT_MAP_DEFAULTS
from kshot.transductive.pt_map import pt_map
from kshot.transductive.tim import DEFAULTS as TIM_DEFAULTS
from kshot.transductive.tim import tim

Normalize = Literal["cl2n", "l2n", "un"]


class TransductiveLearner(SimpleShot):
    """SimpleShot's pretraining with a transductive method at test time; subclasses name the method (`solve`)
    and its options (`method_options`, the keyword arguments of `solve`, which are also option names)."""

    works_on_features = True
    transductive = True
    method_options: ClassVar[tuple[str, ...]] = ()

    def embed(self, images: Tensor) -> Tensor:
        """The backbone's features, unnormalised (`adapt_embedded` normalises them as the method needs)."""
        return self.backbone(images)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        return self.adapt_through_features(support_x, support_y)

    def adapt_embedded(self, support: Tensor, support_y: Tensor) -> Predictor:
        """Normalise the support features (option `normalize`); the predictor takes one task's whole query
        set [Q, D] and returns the method's log-probabilities [Q, N]."""
        ways = classes_in(support_y)
        support = self.transform(support)
        options = {key: self.options[key] for key in self.method_options}
        return lambda query: self.solve(support, support_y, self.transform(query), ways, **options)

    @staticmethod
    @abstractmethod
    def solve(support: Tensor, support_y: Tensor, query: Tensor, ways: int, **options: Any) -> Tensor:
        """The method: log-probabilities [Q, N] of the queries of one task."""


class TIM(TransductiveLearner):
    """TIM-GD (Boudiaf et al., NeurIPS 2020) on L2-normalised features; see `kshot.transductive.tim`."""

    name = "tim"
    method_options = tuple(TIM_DEFAULTS)
    solve = staticmethod(tim)

    @dataclass(config=STRICT)
    class Options(SimpleShot.Options):
        """SimpleShot's (normalize: l2n, as TIM's code), and TIM-GD's: temperature of the logits; ce_weight,
        marginal_weight, conditional_weight: weights of the support cross-entropy, of the marginal entropy
        H(Y_Q) (subtracted) and of the conditional entropy H(Y_Q|X_Q); iterations and lr of Adam. Defaults:
        the authors' code (15, 0.1, 1.0, 0.1, 1,000 iterations, lr 1e-4)."""

        normalize: Normalize = "l2n"
        temperature: PositiveFloat = 15.0
        ce_weight: NonNegativeFloat = 0.1
        marginal_weight: NonNegativeFloat = 1.0
        conditional_weight: NonNegativeFloat = 0.1
        iterations: Count = 1000
        lr: PositiveFloat = 1e-4


class BDCSPN(TransductiveLearner):
    """BD-CSPN (Liu, Song and Qin, ECCV 2020) on L2-normalised features; see `kshot.transductive.bd_cspn`."""

    name = "bd-cspn"
    method_options = tuple(BD_CSPN_DEFAULTS)
    solve = staticmethod(bd_cspn)

    @dataclass(config=STRICT)
    class Options(SimpleShot.Options):
        """SimpleShot's (normalize: l2n, the paper's normalised features), and BD-CSPN's: scale, the paper's
        epsilon (weights of the rectified prototypes, and logits); pseudo_per_class: the Z most confident
        pseudo-labelled queries added to each class, or None for all of them (module docstring)."""

        normalize: Normalize = "l2n"
        scale: PositiveFloat = 10.0
        pseudo_per_class: PositiveCount | None = None


class PTMAP(TransductiveLearner):
    """PT-MAP (Hu, Gripon and Pateux, ICANN 2021) on raw features; see `kshot.transductive.pt_map`."""

    name = "pt-map"
    method_options = tuple(PT_MAP_DEFAULTS)
    solve = staticmethod(pt_map)

    @dataclass(config=STRICT)
    class Options(SimpleShot.Options):
        """SimpleShot's (normalize: only un, since PT-MAP's power transform needs the raw features), and
        PT-MAP's: beta of the power transform; lam, the Sinkhorn regularisation; alpha, the step of the class
        centres; epochs; sinkhorn_tolerance and sinkhorn_iterations, when Sinkhorn stops. Defaults: the
        authors' code (0.5, 10, 0.2, 20, 1e-6, 1,000)."""

        normalize: Literal["un"] = "un"
        beta: Annotated[float, Field(gt=0, le=1)] = 0.5
        lam: PositiveFloat = 10.0
        alpha: Annotated[float, Field(gt=0, le=1)] = 0.2
        epochs: Count = 20
        sinkhorn_tolerance: PositiveFloat = 1e-6
        sinkhorn_iterations: PositiveCount = 1000


class LaplacianShot(TransductiveLearner):
    """LaplacianShot (Ziko et al., ICML 2020) on CL2N features; see `kshot.transductive.laplacianshot`."""

    name = "laplacianshot"
    method_options = tuple(LAPLACIANSHOT_DEFAULTS)
    solve = staticmethod(laplacianshot)

    @dataclass(config=STRICT)
    class Options(SimpleShot.Options):
        """SimpleShot's (normalize: cl2n, as the authors' code), and LaplacianShot's: lam, the weight of the
        Laplacian term (0: nearest prototype); knn, neighbours in the query graph counting the query itself;
        iterations, at most, of the bound optimisation; rectify: prototype rectification with the queries
        (scale rectify_scale). Defaults: the authors' code (1.0, 3, 20, on, 10)."""

        normalize: Normalize = "cl2n"
        lam: NonNegativeFloat = 1.0
        knn: PositiveCount = 3
        iterations: Count = 20
        rectify: bool = True
        rectify_scale: PositiveFloat = 10.0


BASE_MEAN_IMAGES = 10_000
"""Images of the training set whose mean feature stands for the base-class mean when a learner kept none
(its standard error is under 1% of a feature's spread)."""

TRANSDUCTIVE: dict[str, type[TransductiveLearner]] = {cls.name: cls for cls in (TIM, BDCSPN, PTMAP, LaplacianShot)}
"""The transductive methods by learner name."""


def transductive_class(method: str) -> type[TransductiveLearner]:
    """The transductive learner class called `method`, with a one-line error naming the choices."""
    if method not in TRANSDUCTIVE:
        raise ConfigError(f"transductive: unknown method {method!r}; choose one of {', '.join(TRANSDUCTIVE)}")
    return TRANSDUCTIVE[method]


def has_base_mean(learner: Learner) -> bool:
    """True when `learner` keeps a base-class mean feature that training has set (SimpleShot and its kin)."""
    mean, updates = getattr(learner, "feature_mean", None), getattr(learner, "mean_updates", None)
    return isinstance(mean, Tensor) and isinstance(updates, Tensor) and int(updates) > 0


def needs_base_mean(trained: Learner, method: str, **options: Any) -> bool:
    """True when `method` with `options` centres features on the base-class mean (CL2N) and `trained` keeps
    none: `transductive_learner` then needs the training set (`base`) to compute it."""
    normalize = options.get("normalize", transductive_class(method).Options().normalize)
    return normalize == "cl2n" and not has_base_mean(trained)


def base_class_mean(learner: Learner, base: ClassDataset, images: int = BASE_MEAN_IMAGES, seed: int = 0,
                    batch_size: int = 500) -> Tensor:
    """The mean backbone feature [D] over a seeded random subset of `images` images of `base` (the classes the
    backbone was trained on, rotations included where training used them), with batch norm on its running
    statistics: what SimpleShot's moving average estimates during training, for a learner that kept none."""
    parameter = next(learner.backbone.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    counts = base.counts()
    classes = torch.arange(len(counts)).repeat_interleave(counts)
    positions = torch.arange(len(classes)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    chosen = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))[:images]
    modes = {module: module.training for module in learner.modules()}
    learner.eval()
    total = None
    try:
        with torch.no_grad():
            for batch in chosen.split(batch_size):
                pixels = base.images_at(classes[batch].numpy(), positions[batch].numpy())
                features = learner.backbone(base.to_model(pixels).to(device)).flatten(1).double().sum(0)
                total = features if total is None else total + features
    finally:
        for module, training in modes.items():
            module.training = training
    if total is None:
        raise ValueError(f"{base.name} holds no images to compute the base-class mean from")
    return (total / len(chosen)).float()


def transductive_learner(trained: Learner, method: str, base: ClassDataset | None = None, **options: Any
                         ) -> TransductiveLearner:
    """The transductive learner `method` ("tim", "bd-cspn", "pt-map", "laplacianshot") on the backbone of
    `trained`, any learner whose backbone gives feature vectors.

    The backbone module is shared, not copied (so no memory is doubled; training one trains the other). The
    base-class mean feature, which CL2N centres on (LaplacianShot's default), is copied from `trained` when it
    keeps one (SimpleShot and the transductive learners); otherwise it is computed from `base`, the training set
    (`base_class_mean`), when given. Without either, asking for CL2N (LaplacianShot's default included) is a
    one-line error: the alternative, no centring (normalize="l2n"), must be chosen explicitly, because
    LaplacianShot's prototype rectification then works poorly (60% against 97% for a plain nearest prototype on
    a ProtoNet's Omniglot features, 5-way 1-shot, 30 episodes). `options` are the method's (defaults: the
    authors'). The input contract and backbone spec are carried over, so the learner reads files as `trained`
    does and its checkpoints rebuild it."""
    cls = transductive_class(method)
    mean = None
    if has_base_mean(trained):
        mean = trained.feature_mean
    elif needs_base_mean(trained, method, **options):
        if base is None:
            raise ConfigError(f"options.normalize: {method} centres features on the base-class mean (cl2n), which "
                              f"this {trained.name} learner does not keep; give the training set (base=...) to "
                              f"compute it, or choose normalize='l2n' (no centring)")
        mean = base_class_mean(trained, base)
    learner = cls(trained.backbone, trained.image_shape, **options)
    parameter = next(trained.backbone.parameters(), None)
    if parameter is not None:
        learner.to(parameter.device)
    if mean is not None:
        with torch.no_grad():
            learner.feature_mean.copy_(mean)
            learner.mean_updates.fill_(int(trained.mean_updates) if has_base_mean(trained) else 1)
    learner.backbone_spec = getattr(trained, "backbone_spec", None) or learner.config()["backbone"]
    contract = getattr(trained, "input_contract", None)
    if contract is not None:
        learner.input_contract = contract
    learner.trained_as = trained.name
    return learner
