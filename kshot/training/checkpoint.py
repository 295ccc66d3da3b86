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

from kshot.backbones import rebuildable, unrebuildable_message
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
    """Write `folder` atomically: weights, {"model": learner.config(), **info}, and optional trainer state.
    Refuses a learner whose backbone could not be rebuilt when loading (a bare module instance)."""
    folder = Path(folder)
    if not rebuildable(learner.config()["backbone"]):
        raise CheckpointError(unrebuildable_message(learner.config()["backbone"]))
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
                            model.get("options"), model.get("input_contract"))
    load_learner_weights(learner, folder, map_location)
    return learner.to(map_location), info


def load_learner_weights(learner: Learner, folder: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load the weights saved in `folder` into `learner`, with a clear error if they do not fit it."""
    weights = load_file(str(Path(folder) / WEIGHTS), device=str(map_location))
    missing, unexpected = learner.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit this {learner.name} learner "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


TRAINER_STATE_KEYS = ("optimizer", "scheduler", "stream", "torch_rng", "best_metric", "step", "train_seconds")


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """The optimiser, schedule, sampler and RNG state saved beside the weights, to resume training.

    Loaded with `weights_only=True`: only tensors and plain data (dicts, lists, numbers, strings) are rebuilt,
    never arbitrary objects, so a crafted trainer_state.pt cannot run code on `--resume`."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no trainer state, so training cannot resume from it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for foreign objects, others for damaged files
        raise CheckpointError(f"{path} is not trainer state that kshot wrote ({type(error).__name__}: it holds "
                              f"something other than tensors and plain data, or is damaged) and was not loaded; "
                              f"start a new run (another --out, or --overwrite)") from None
    missing = [key for key in TRAINER_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}, so training cannot resume from it; start a new "
                              f"run (another --out, or --overwrite)")
    return state


def recover_checkpoints(folder: Path) -> None:
    """Tidy a checkpoints folder after a killed run: delete the `.NAME.*.partial` folders of unfinished saves, and
    finish any interrupted replacement of `NAME` by its `.NAME.old` copy (see `_replace_dir`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for partial in folder.glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    for old in folder.glob(".*.old"):
        target = folder / old.name[1:-len(".old")]
        if (target / INFO).is_file() and (target / WEIGHTS).is_file():
            shutil.rmtree(old, ignore_errors=True)
        elif (old / INFO).is_file():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(old, target)


def has_checkpoint(folder: Path) -> bool:
    """Whether the checkpoints folder `folder` holds a finished checkpoint (last or best)."""
    return any((Path(folder) / name / INFO).is_file() for name in ("last", "best", ".last.old", ".best.old"))
