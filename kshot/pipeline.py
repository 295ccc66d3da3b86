"""Recipe in, trained and evaluated model out: the one path shared by the CLI and the benchmark scripts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kshot.data.registry import load_dataset
from kshot.data.sampler import EpisodeSet
from kshot.distributed import current_group, local_device
from kshot.evaluation import EvaluationResult, evaluate
from kshot.learners import Learner, build_learner
from kshot.recipe import Recipe
from kshot.training.checkpoint import load_learner
from kshot.training.trainer import Trainer

RESULTS_FILE = "results.json"


def current_commit() -> str:
    """The git commit of the kshot checkout ($KSHOT_COMMIT where the tree was copied without .git)."""
    if os.environ.get("KSHOT_COMMIT"):
        return os.environ["KSHOT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class TrainedRun:
    learner: Learner
    run_dir: Path
    history: list[dict[str, Any]]
    train_seconds: float
    steps: int


def train_recipe(recipe: Recipe, run_dir: str | Path, device: str = "cpu", resume: bool = False,
                 overwrite: bool = False, progress: bool = True) -> TrainedRun:
    """Build the recipe's learner, train it into `run_dir`, and return it with its best weights loaded.
    Under torchrun every process calls this and trains its share of each batch (see
    `kshot.distributed`); afterwards only the main process should evaluate and write results."""
    train = load_dataset(recipe.dataset, recipe.splits["train"])
    val = load_dataset(recipe.dataset, recipe.splits["val"]) if recipe.splits.get("val") else None
    device = str(local_device(device))  # under torchrun, this process's own GPU
    if device != "cpu":
        train = train.to(device)
        val = val.to(device) if val is not None else None
    torch.manual_seed(recipe.train.seed)  # the same initial weights for the same recipe
    learner = build_learner(recipe.learner, train.image_shape, recipe.backbone, recipe.options)
    run_info = {"recipe": recipe.to_dict(), "commit": current_commit()}
    trainer = Trainer(learner, recipe.train, run_dir, device=device, progress=progress, run_info=run_info)
    history = trainer.fit(train, val, resume=resume, overwrite=overwrite)
    best, _ = load_learner(trainer.best_dir, map_location=device)
    return TrainedRun(best, Path(run_dir), history, trainer.train_seconds, trainer.step)


def evaluate_recipe(learner: Learner, recipe: Recipe, device: str = "cpu", bn_mode: str | None = None,
                    episodes: int | None = None, progress: bool = True, across_processes: bool = False
                    ) -> list[EvaluationResult]:
    """Evaluate on the recipe's test split for each of its evaluation settings (fixed, seeded episodes); under
    torchrun, `across_processes` has every process score its share of the episodes."""
    device = str(local_device(device))
    test = load_dataset(recipe.dataset, recipe.splits["test"])
    if device != "cpu":
        test = test.to(device)
    results = []
    for setting in recipe.evaluate:
        episode_set = EpisodeSet(test, setting.ways, setting.shots, setting.queries, episodes or setting.episodes,
                                 seed=setting.seed)
        results.append(evaluate(learner, episode_set, bn_mode=bn_mode or recipe.bn_mode, device=device,
                                progress=progress, across_processes=across_processes))
    return results


def result_rows(recipe: Recipe, results: list[EvaluationResult], train_seconds: float, steps: int,
                device: str) -> list[dict[str, Any]]:
    """Rows in the benchmark results format (accuracy and ci95 in percent)."""
    commit = current_commit()
    rows = []
    for setting, result in zip(recipe.evaluate, results):
        rows.append({"method": recipe.learner, "recipe": recipe.name, "dataset": result.dataset,
                     "ways": result.ways, "shots": result.shots, "queries": result.queries,
                     "episodes": result.episodes, "accuracy": round(result.accuracy, 3), "ci95": round(result.ci95, 3),
                     "paper": setting.paper, "bn_mode": result.bn_mode, "train_steps": steps,
                     "train_seconds": round(train_seconds, 1), "eval_seconds": round(result.seconds, 1),
                     "device": device_name(device), "commit": commit, "date": time.strftime("%Y-%m-%d")})
    return rows


def device_name(device: str) -> str:
    """What a result ran on, for its row: the GPU's name or the CPU's thread count, and the process count of a
    distributed run (e.g. "cpu (1 threads) x 2 processes")."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(local_device(device))
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    group = current_group()
    return name if group is None else f"{name} x {group.world_size} processes"


def write_results(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(run_dir) / RESULTS_FILE
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
