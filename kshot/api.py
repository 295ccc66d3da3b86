"""The Keras-like front door: build, fit, evaluate, adapt, predict, save and load in a handful of lines.

    model = kshot.FewShotModel("protonet")
    model.fit(kshot.data.omniglot("train"), val=kshot.data.omniglot("val"), ways=20, shots=1, queries=5, steps=500)
    print(model.evaluate(kshot.data.omniglot("test"), ways=5, shots=1).summary())
    classifier = model.adapt(["a1.png", "b1.png"], ["alpha", "beta"]);  classifier.predict(["q.png"])
    print(model.transductive("tim").evaluate(kshot.data.omniglot("test"), ways=5, shots=1).summary())

A model carries its input contract (`model.input_contract`): image files given to adapt/predict/evaluate are
decoded exactly as its training data was, so the same raw file gives the same tensor.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import kshot.pretrained  # noqa: F401  (registers the pretrained backbones, so checkpoints built on them load)
from kshot.allocator import tune_malloc
from kshot.backbones import rebuildable, unrebuildable_message
from kshot.batchnorm import BN_MODES, batchnorm_mode
from kshot.config import ConfigError, TrainConfig, parse
from kshot.data.augment import parse_augment_spec
from kshot.data.contract import InputContract, InputError, check_decoded_as, check_images, require_contract
from kshot.data.dataset import ClassDataset, to_float
from kshot.data.folder import image_files, image_folder
from kshot.data.sampler import EpisodeSet, check_request
from kshot.evaluation import EvaluationResult, evaluate
from kshot.learners import Learner, build_learner, learner_class
from kshot.training.checkpoint import load_learner, load_learner_weights, save_checkpoint
from kshot.training.optim import optimizer_settings
from kshot.training.trainer import Trainer

Images = Tensor | np.ndarray | Sequence[str | Path] | str | Path
"""Images for adapt/predict: uint8 (0-255) or float (0-1) [M, C, H, W] / [M, H, W], image files, or a folder."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_images(images: Tensor | np.ndarray, image_shape: tuple[int, ...] | None = None,
              contract: InputContract | None = None) -> Tensor:
    """Tensors given directly (uint8 0-255 or float 0-1, [M, C, H, W] or [M, H, W]) as the network's float input;
    NaN, floats outside [0, 1] and shapes other than the model's are refused with a one-line error."""
    images = torch.as_tensor(images)
    if images.dim() == 3 and (image_shape is None or image_shape[0] == 1):
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise InputError(f"images must be [count, channels, height, width], got shape {tuple(images.shape)}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise InputError(f"images have shape {tuple(images.shape[1:])} but the model was built for "
                         f"{tuple(image_shape)}; give image files (decoded by the model's input contract) or "
                         f"tensors of that shape")
    images = check_images(images)
    return contract.to_model(images) if contract is not None else to_float(images)


class AdaptedClassifier:
    """A model adapted to one support set; predicts the support's own labels for new images."""

    def __init__(self, model: FewShotModel, support_x: Tensor, labels: Sequence[Any]) -> None:
        self.model = model
        self.classes = list(dict.fromkeys(labels))  # first-seen order, any hashable labels
        index = {label: i for i, label in enumerate(self.classes)}
        support_y = torch.tensor([index[label] for label in labels], device=model.device)
        learner = model.learner
        with batchnorm_mode(learner, model.bn_mode), torch.no_grad():
            self._predictor = learner.adapt(support_x.to(model.device), support_y)

    def scores(self, images: Images) -> Tensor:
        """Logits [M, N] over `classes` for images given as tensors, files or a folder of files."""
        x = self.model.model_input(images).to(self.model.device)
        with batchnorm_mode(self.model.learner, self.model.bn_mode), torch.no_grad():
            return self._predictor(x)

    def predict_proba(self, images: Images) -> Tensor:
        return self.scores(images).softmax(-1)

    def predict(self, images: Images) -> list[Any]:
        """The most likely support label for each image."""
        return [self.classes[i] for i in self.scores(images).argmax(-1).tolist()]


class FewShotModel:
    """A learner and its backbone, with fit / evaluate / adapt / save / load.

    `backbone` is a registered name ("conv4", "mlp"), a spec dict ({"name": "conv4", "hidden": 32}, or
    {"name": "import", "target": "package.module:factory"}), or an nn.Module (trainable and usable, but only
    savable once it is registered: see `kshot.backbones.register_backbone`). Options are the learner's
    (checked against its schema at once)."""

    def __init__(self, learner: str | Learner = "protonet", backbone: str | dict[str, Any] | nn.Module = "conv4",
                 device: str | torch.device | None = None, bn_mode: str = "inference", **options: Any) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        if bn_mode not in BN_MODES:
            raise ConfigError(f"bn_mode: {bn_mode!r} is not one of {', '.join(BN_MODES)}")
        self.bn_mode = bn_mode
        if isinstance(learner, Learner):
            self.learner: Learner | None = learner.to(self.device)
            self._spec: dict[str, Any] = {}
        else:
            cls = learner_class(learner)
            if hasattr(cls, "Options"):
                parse(cls.Options, options, "options")  # a typo is an error now, not after training
            if not isinstance(backbone, nn.Module):
                from kshot.backbones import parse_backbone_spec

                backbone = parse_backbone_spec(backbone)
            self.learner = None
            self._spec = {"learner": learner, "backbone": backbone, "options": options}
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ facts
    @property
    def input_contract(self) -> InputContract | None:
        """How image files become this model's input (None for a model trained on tensors only)."""
        return getattr(self.learner, "input_contract", None)

    def _build(self, image_shape: tuple[int, ...]) -> Learner:
        if self.learner is None:
            self.learner = build_learner(self._spec["learner"], image_shape, self._spec["backbone"],
                                         self._spec["options"]).to(self.device)
        return self.learner

    def _require(self) -> Learner:
        if self.learner is None:
            raise RuntimeError("the model has no weights yet: call fit(...) or FewShotModel.load(path) first")
        return self.learner

    def _learner_class(self) -> type[Learner]:
        return type(self.learner) if self.learner is not None else learner_class(self._spec["learner"])

    # ------------------------------------------------------------------------------------------ training
    def fit(self, train: ClassDataset, val: ClassDataset | None = None, run_dir: str | Path | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = True,
            augment: dict[str, Any] | None = None, **settings: Any) -> list[dict[str, Any]]:
        """Meta-train on `train` (validating on `val`); settings are `TrainConfig` fields (ways, shots, steps...),
        all checked before training starts. The outer optimiser is the learner's own unless set (Reptile: SGD).
        `augment` (e.g. {"crop": {"kind": "random_resized"}, "flip": 0.5}) augments training batches only.

        Ends on the best weights by validation (the last ones without `val`), as the CLI does. Without
        `run_dir`, checkpoints go to a temporary folder that is removed afterwards."""
        config = settings.pop("config", None) or TrainConfig.from_dict(settings)
        augment = parse_augment_spec(augment)
        tune_malloc()  # see kshot/allocator.py: training's large per-step buffers stay in the process
        optimizer_settings(config, self._learner_class())
        if self._learner_class().trains_on_episodes:
            check_request(train, config.ways, config.shots, config.queries)
        if val is not None and config.val_every > 0:
            check_request(val, config.val_ways, config.val_shots or config.shots, config.val_queries)
        learner = self._build(train.image_shape)
        spec = learner.config()["backbone"]
        if not rebuildable(spec):
            raise ConfigError(unrebuildable_message(spec))
        if train.contract is not None:
            known = self.input_contract
            if known is not None and known != train.contract:
                raise InputError(f"this model was trained on {known.describe()} but `train` is "
                                 f"{train.contract.describe()}; load it with the model's contract")
            learner.input_contract = train.contract
        if run_dir is None:
            with tempfile.TemporaryDirectory(prefix="kshot-run-") as folder:
                return self._fit(learner, config, train, val, Path(folder), resume, overwrite, progress, augment)
        return self._fit(learner, config, train, val, Path(run_dir), resume, overwrite, progress, augment)

    def _fit(self, learner: Learner, config: TrainConfig, train: ClassDataset, val: ClassDataset | None,
             run_dir: Path, resume: bool, overwrite: bool, progress: bool, augment: dict[str, Any] | None
             ) -> list[dict[str, Any]]:
        trainer = Trainer(learner, config, run_dir, device=self.device, progress=progress,
                          run_info={"bn_mode": self.bn_mode}, augment=augment)
        self.history = trainer.fit(train, val, resume=resume, overwrite=overwrite)
        load_learner_weights(learner, trainer.best_dir, self.device)
        self.run_dir = run_dir
        return self.history

    # ------------------------------------------------------------------------------------------ inference
    def model_input(self, images: Images) -> Tensor:
        """Images as tensors, files or a folder of files, as the float input of the network."""
        learner = self._require()
        if isinstance(images, (str, Path)):
            folder = Path(images)
            if not folder.is_dir():
                images = [folder]
            else:
                images = image_files(folder)
                if not images:
                    raise InputError(f"{folder} holds no image files")
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, Path)):
            contract = require_contract(self.input_contract, "image files")
            return contract.to_model(contract.decode_files(list(images)))
        return as_images(images, learner.image_shape, self.input_contract)

    def evaluate(self, data: ClassDataset | EpisodeSet | str | Path, ways: int = 5, shots: int = 1,
                 queries: int = 15, episodes: int = 1000, seed: int = 0, bn_mode: str | None = None,
                 progress: bool = True, across_processes: bool = False) -> EvaluationResult:
        """Mean accuracy and 95% CI over a fixed set of episodes (the same for the same arguments). `data` may
        be a folder of class sub-folders, decoded with the model's contract; under torchrun,
        `across_processes` splits the episodes between the processes (see `kshot.evaluation`)."""
        learner = self._require()
        tune_malloc()  # as in fit: evaluation's per-chunk buffers stay in the process instead of page-faulting back
        if isinstance(data, (str, Path)):
            data = image_folder(data, contract=require_contract(self.input_contract, f"the images in {data}"))
        dataset = data.dataset if isinstance(data, EpisodeSet) else data
        self.check_dataset(dataset)
        episode_set = data if isinstance(data, EpisodeSet) else EpisodeSet(data, ways, shots, queries, episodes, seed)
        return evaluate(learner, episode_set, bn_mode=bn_mode or self.bn_mode, device=self.device,
                        progress=progress, across_processes=across_processes)

    def transductive(self, method: str, base: ClassDataset | None = None, **options: Any) -> FewShotModel:
        """A new model that predicts with transductive inference `method` ("tim", "bd-cspn", "pt-map" or
        "laplacianshot", see `kshot.learners.transductive`) on this model's trained backbone, shared, not copied.
        `options` are the method's (defaults: its authors'). `base`, the training set, is needed only when the
        method centres features on the base-class mean (LaplacianShot) and this model keeps none (a ProtoNet):
        the mean is then computed from it. Evaluation results of the new model say they are transductive; its
        classifiers from `adapt` label the images of each `predict` call together, as one query set."""
        from kshot.learners.transductive import transductive_learner

        if base is not None:
            self.check_dataset(base)
        learner = transductive_learner(self._require(), method, base=base, **options)
        return FewShotModel(learner, device=self.device, bn_mode=self.bn_mode)

    def check_dataset(self, dataset: ClassDataset) -> None:
        """A one-line error when `dataset` was decoded otherwise than this model's training data."""
        learner = self._require()
        if tuple(dataset.image_shape) != tuple(learner.image_shape):
            raise InputError(f"{dataset.name} holds images of shape {tuple(dataset.image_shape)} but the model "
                             f"expects {tuple(learner.image_shape)}; load it with the model's contract "
                             f"(kshot.data.image_folder(path, contract=model.input_contract))")
        check_decoded_as(self.input_contract, dataset,
                         "load it with kshot.data.image_folder(path, contract=model.input_contract)")

    def adapt(self, support: Images, support_labels: Sequence[Any] | Tensor | None = None) -> AdaptedClassifier:
        """Adapt to a support set whose labels can be any hashable values (class names, ids). `support` may be
        tensors, image files (decoded with the model's contract), or a folder with one sub-folder per class
        (then the labels are the sub-folder names and `support_labels` is not given)."""
        self._require()
        if isinstance(support, (str, Path)) and Path(support).is_dir() and support_labels is None:
            contract = require_contract(self.input_contract, f"the images in {support}")
            folder = image_folder(support, contract=contract)
            raw, ids = folder.all_images()
            names = folder.class_names()
            support_labels = [names[i] for i in ids.tolist()]
            images = contract.to_model(raw)
        else:
            if support_labels is None:
                raise InputError("give one label per support image (or a folder with one sub-folder per class)")
            images = self.model_input(support)
        labels = support_labels.tolist() if isinstance(support_labels, Tensor) else list(support_labels)
        if len(labels) != len(images):
            raise InputError(f"{len(images)} support images but {len(labels)} labels; give one label per image")
        return AdaptedClassifier(self, images, labels)

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save weights, config, input contract and bn_mode to the folder `path` (refuses to replace an existing
        one unless asked; a replaced folder is swapped in only once the new one is complete)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another path")
        return save_checkpoint(path, self._require(), {"bn_mode": self.bn_mode})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> FewShotModel:
        """A model from a checkpoint folder (a run's checkpoints/best, or a folder written by `save`)."""
        path = Path(path)
        if (path / "checkpoints" / "best").is_dir():
            path = path / "checkpoints" / "best"
        device = torch.device(device) if device is not None else default_device()
        learner, info = load_learner(path, map_location=device)
        if getattr(learner, "input_contract", None) is None:
            learner.input_contract = legacy_contract(info)
        return cls(learner, device=device, bn_mode=saved_bn_mode(info))

    @classmethod
    def pretrained(cls, name: str, learner: str = "simpleshot", device: str | torch.device | None = None,
                   trainable: bool = False, **options: Any) -> FewShotModel:
        """A model on the pretrained network `name` (see `kshot.pretrained.PRETRAINED`), ready to `adapt` to a
        user's classes with no meta-training: nearest class centroid over its frozen features, L2-normalised
        by default (SimpleShot's L2N: 11.7 points above ProtoNet's raw features 5-way 1-shot, level 5-shot, in
        benchmarks/pretrained_photos.py; `learner="protonet"` for raw ones). Files are decoded with the network's
        own preprocessing (`model.input_contract`); `model.pretrained_on` says which classes it has seen."""
        from kshot.pretrained import pretrained_network

        network = pretrained_network(name)
        if learner == "simpleshot":
            options.setdefault("normalize", "l2n")  # no base-class mean to centre on: the network is used as is
        model = cls(learner, backbone={"name": name, "trainable": trainable}, device=device, **options)
        model._build(network.contract.image_shape).input_contract = network.contract
        return model

    @property
    def pretrained_on(self) -> str | None:
        """What the backbone was pretrained on, for a model on a network of `kshot.pretrained` (else None)."""
        from kshot.pretrained import PRETRAINED

        network = PRETRAINED.get((getattr(self.learner, "backbone_spec", None) or {}).get("name"))
        return network.pretrained_on if network is not None else None


def saved_bn_mode(info: dict[str, Any]) -> str:
    """The batch-norm mode a checkpoint was trained and validated with (its recipe's, or the API's)."""
    return info.get("bn_mode") or (info.get("recipe") or {}).get("bn_mode") or "inference"


def legacy_contract(info: dict[str, Any]) -> InputContract | None:
    """The contract of a checkpoint written before contracts were recorded, from its recipe's dataset."""
    dataset = (info.get("recipe") or {}).get("dataset") or {}
    if dataset.get("name") == "omniglot":
        from kshot.data.contract import omniglot_contract

        return omniglot_contract(int(dataset.get("image_size", 28)))
    return None
