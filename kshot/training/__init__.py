"""Training: the trainer, checkpoints, and the errors that stop a run before it can lose work."""

from kshot.config import TrainConfig
from kshot.training.checkpoint import CheckpointError, load_learner, save_checkpoint
from kshot.training.trainer import (
    ResumeSettingsError,
    RunExistsError,
    RunLockedError,
    Trainer,
    TrainingDivergedError,
)

__all__ = ["CheckpointError", "ResumeSettingsError", "RunExistsError", "RunLockedError", "TrainConfig", "Trainer",
           "TrainingDivergedError", "load_learner", "save_checkpoint"]
