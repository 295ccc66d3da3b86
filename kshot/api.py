"""The Keras-like front door: build, fit, evaluate, adapt, predict, save and load in a handful of lines.

    model = kshot.FewShotModel("protonet")
    model.fit(kshot.data.omniglot("train"), val=kshot.data.omniglot("val"), ways=20, shots=1, queries=5, steps=500)
    print(model.evaluate(kshot.data.omniglot("test"), ways=5, shots=1).summary())
    classifier = model.adapt(support_images, ["cat", "dog", ...]);  classifier.predict(query_images)
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kshot.batchnorm import batchnorm_mode
from kshot.data.dataset import ClassDataset, to_float
from kshot.data.sampler import EpisodeSet
from kshot.evaluation import EvaluationResult, evaluate
from kshot.learners import Learner, build_learner
from kshot.training.checkpoint import load_learner, save_checkpoint
from kshot.training.trainer import TrainConfig, Trainer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_images(images: Tensor, image_shape: tuple[int, ...] | None = None) -> Tensor:
    """User images (uint8 0-255 or float 0-1, [M, C, H, W] or [M, H, W]) as float [M, C, H, W]."""
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images must be [count, channels, height, width], got shape {tuple(images.shape)}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images have shape {tuple(images.shape[1:])} but the model was built for "
                         f"{tuple(image_shape)}; resize them (e.g. kshot.data.image_folder(..., image_size=N))")
    return to_float(images) if images.dtype == torch.uint8 else images.float()


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

    def scores(self, images: Tensor) -> Tensor:
        """Logits [M, N] over `classes`."""
        images = as_images(images, self.model.learner.image_shape).to(self.model.device)
        with batchnorm_mode(self.model.learner, self.model.bn_mode), torch.no_grad():
            return self._predictor(images)

    def predict_proba(self, images: Tensor) -> Tensor:
        return self.scores(images).softmax(-1)

    def predict(self, images: Tensor) -> list[Any]:
        """The most likely support label for each image."""
        return [self.classes[i] for i in self.scores(images).argmax(-1).tolist()]


class FewShotModel:
    """A learner and its backbone, with fit / evaluate / adapt / save / load."""

    def __init__(self, learner: str | Learner = "protonet", backbone: str | dict[str, Any] = "conv4",
                 device: str | torch.device | None = None, bn_mode: str = "inference", **options: Any) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.bn_mode = bn_mode
        self._spec = {"learner": learner, "backbone": {"name": backbone} if isinstance(backbone, str) else backbone,
                      "options": options}
        self.learner: Learner | None = learner.to(self.device) if isinstance(learner, Learner) else None
        self.history: list[dict[str, Any]] = []

    def _build(self, image_shape: tuple[int, ...]) -> Learner:
        if self.learner is None:
            self.learner = build_learner(self._spec["learner"], image_shape, self._spec["backbone"],
                                         self._spec["options"]).to(self.device)
        return self.learner

    def _require(self) -> Learner:
        if self.learner is None:
            raise RuntimeError("the model has no weights yet: call fit(...) or FewShotModel.load(path) first")
        return self.learner

    def fit(self, train: ClassDataset, val: ClassDataset | None = None, run_dir: str | Path | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = True, **settings: Any
            ) -> list[dict[str, Any]]:
        """Meta-train on `train` (validating on `val`); settings are `TrainConfig` fields (ways, shots, steps...)."""
        config = settings.pop("config", None) or TrainConfig.from_dict(settings)
        learner = self._build(train.image_shape)
        if run_dir is None:
            run_dir = tempfile.mkdtemp(prefix="kshot-run-")
        trainer = Trainer(learner, config, run_dir, device=self.device, progress=progress)
        self.history = trainer.fit(train, val, resume=resume, overwrite=overwrite)
        self.run_dir = Path(run_dir)
        return self.history

    def evaluate(self, data: ClassDataset | EpisodeSet, ways: int = 5, shots: int = 1, queries: int = 15,
                 episodes: int = 1000, seed: int = 0, bn_mode: str | None = None, progress: bool = True,
                 across_processes: bool = False) -> EvaluationResult:
        """Mean accuracy and 95% CI over a fixed set of episodes (the same for the same arguments); under
        torchrun, `across_processes` splits the episodes between the processes (see `kshot.evaluation`)."""
        episode_set = data if isinstance(data, EpisodeSet) else EpisodeSet(data, ways, shots, queries, episodes, seed)
        return evaluate(self._require(), episode_set, bn_mode=bn_mode or self.bn_mode, device=self.device,
                        progress=progress, across_processes=across_processes)

    def adapt(self, support_x: Tensor, support_labels: Sequence[Any] | Tensor) -> AdaptedClassifier:
        """Adapt to a support set whose labels can be any hashable values (class names, ids)."""
        learner = self._require()
        labels = support_labels.tolist() if isinstance(support_labels, Tensor) else list(support_labels)
        images = as_images(support_x, learner.image_shape)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} support images but {len(labels)} labels; give one label per image")
        return AdaptedClassifier(self, images, labels)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save weights and config to the folder `path` (refuses to replace an existing one unless asked)."""
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
        return cls(learner, device=device, bn_mode=info.get("bn_mode", "inference"))

