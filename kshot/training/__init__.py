"""Training: the trainer and checkpoints."""

from kshot.config import TrainConfig
from kshot.training.checkpoint import CheckpointError, load_learner, save_checkpoint
from kshot.training.trainer import RunExistsError, Trainer

__all__ = ["CheckpointError", "RunExistsError", "TrainConfig", "Trainer", "load_learner", "save_checkpoint"]
