"""Checkpoints: safetensors weights, a readable JSON of what the model is and how far training got, and the
optimiser/RNG state to resume. Each checkpoint is a folder written aside and renamed into place, so a crash
never leaves a half-written checkpoint where a good one was."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kshot.learners import Learner, build_learner

WEIGHTS = "model.safetensors"
INFO = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def _replace_dir(source: Path, target: Path) -> None:
    """Move the finished folder `source` to `target`, replacing an older `target` only once `source` is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def save_checkpoint(folder: Path, learner: Learner, info: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write `folder` atomically: weights, {"model": learner.config(), **info}, and optional trainer state."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        weights = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in learner.state_dict().items()}
        save_file(weights, str(staging / WEIGHTS))
        if trainer_state is not None:
            torch.save(trainer_state, staging / TRAINER_STATE)
        # The JSON goes last: a folder that has it has everything.
        (staging / INFO).write_text(json.dumps({"model": learner.config(), **info}, indent=2, default=str) + "\n")
        _replace_dir(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_info(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / INFO).is_file() or not (folder / WEIGHTS).is_file():
        old = folder.with_name(f".{folder.name}.old")
        if (old / INFO).is_file():  # a crash between the two renames of _replace_dir
            os.replace(old, folder)
        else:
            raise CheckpointError(f"{folder} is not a kshot checkpoint (needs {WEIGHTS} and {INFO})")
    return json.loads((folder / INFO).read_text())


def load_learner(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[Learner, dict[str, Any]]:
    """Rebuild the learner saved in `folder` and load its weights; returns (learner, checkpoint info)."""
    folder = Path(folder)
    info = read_info(folder)
    model = info["model"]
    learner = build_learner(model["learner"], tuple(model["image_shape"]), model.get("backbone"),
                            model.get("options"))
    load_learner_weights(learner, folder, map_location)
    return learner.to(map_location), info


def load_learner_weights(learner: Learner, folder: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load the weights saved in `folder` into `learner`, with a clear error if they do not fit it."""
    weights = load_file(str(Path(folder) / WEIGHTS), device=str(map_location))
    missing, unexpected = learner.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit this {learner.name} learner "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no trainer state, so training cannot resume from it")
    return torch.load(path, map_location="cpu", weights_only=False)
