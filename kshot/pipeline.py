"""Recipe in, trained and evaluated model out: the one path shared by the CLI and the benchmark scripts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kshot.data.dataset import ClassDataset
from kshot.data.registry import folder_contract, load_dataset
from kshot.data.sampler import EpisodeRequestError, EpisodeSet, check_request
from kshot.distributed import current_group, local_device
from kshot.evaluation import EvaluationResult, evaluate
from kshot.learners import Learner, build_learner, learner_class
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


@dataclass
class PreparedData:
    """The datasets of a checked recipe: loaded once, checked against every episode shape the run will ask for."""

    train: ClassDataset
    val: ClassDataset | None
    test: ClassDataset | None
    notes: list[str]


def prepare_recipe_data(recipe: Recipe, explicit: set[str] | None = None, with_test: bool = True
                        ) -> tuple[Recipe, PreparedData]:
    """Load the recipe's splits and check, before anything trains or is deleted, that they can provide the
    training, validation and test episodes it asks for (`EpisodeRequestError` otherwise).

    For a user's folder, settings the user did not set explicitly (`explicit`: dotted keys such as
    "train.ways") are fitted to the data (fewer ways or queries for a small folder), and `notes` say what was
    derived; shipped benchmarks are never changed, only checked."""
    notes: list[str] = []
    if recipe.dataset["name"] == "folder":
        contract, said = folder_contract(recipe.dataset)
        if said:
            notes.append(f"{recipe.dataset['path']}: {said}")
    else:
        contract = None
    train = load_dataset(recipe.dataset, recipe.splits["train"], contract=contract, augment=True)
    val = load_dataset(recipe.dataset, recipe.splits["val"], contract=contract) \
        if recipe.splits.get("val") and recipe.train.val_every > 0 else None
    test = load_dataset(recipe.dataset, recipe.splits["test"], contract=contract) \
        if with_test and recipe.evaluate else None
    if recipe.dataset["name"] == "folder":
        recipe = fit_to_folder(recipe, train, val, test, explicit or set(), notes)
    check_recipe_against_data(recipe, train, val, test)
    return recipe, PreparedData(train, val, test, notes)


def check_recipe_against_data(recipe: Recipe, train: ClassDataset, val: ClassDataset | None,
                              test: ClassDataset | None) -> None:
    """Every episode shape of the run (training, validation, each test setting) is one the data can give."""
    config = recipe.train
    learner = learner_class(recipe.learner)
    if learner.trains_on_episodes:
        _check("train", train, config.ways, config.shots, config.queries)
    if val is not None:
        _check("train.val_*", val, config.val_ways, config.val_shots or config.shots, config.val_queries)
    for i, setting in enumerate(recipe.evaluate if test is not None else []):
        _check(f"evaluate[{i}]", test, setting.ways, setting.shots, setting.queries)


def _check(where: str, dataset: ClassDataset, ways: int, shots: int, queries: int) -> None:
    try:
        check_request(dataset, ways, shots, queries)
    except EpisodeRequestError as error:
        raise EpisodeRequestError(f"{where}: {error}") from None


def fit_to_folder(recipe: Recipe, train: ClassDataset, val: ClassDataset | None, test: ClassDataset | None,
                  explicit: set[str], notes: list[str]) -> Recipe:
    """The recipe with the episode shapes the user did not set lowered to what their folder can give."""
    config = asdict(recipe.train)
    changes: list[str] = []

    def fit(key: str, value: int, limit: int, floor: int = 1) -> int:
        if f"train.{key}" in explicit or value <= limit or limit < floor:
            return value
        changes.append(f"train.{key} {value} -> {limit}")
        return limit

    if learner_class(recipe.learner).trains_on_episodes:
        config["ways"] = fit("ways", config["ways"], train.num_classes, 2)
        config["queries"] = fit("queries", config["queries"], int(train.class_counts.min()) - config["shots"])
    if val is not None:
        config["val_ways"] = fit("val_ways", config["val_ways"], val.num_classes, 2)
        shots = config["val_shots"] or config["shots"]
        config["val_queries"] = fit("val_queries", config["val_queries"], int(val.class_counts.min()) - shots)
    evaluate = []
    for i, setting in enumerate(recipe.evaluate):
        values = asdict(setting)
        if test is not None and "evaluate" not in {k.split(".")[0] for k in explicit}:
            for key, limit in (("ways", test.num_classes), ("queries", int(test.class_counts.min()) - values["shots"])):
                if values[key] > limit >= (2 if key == "ways" else 1):
                    changes.append(f"evaluate[{i}].{key} {values[key]} -> {limit}")
                    values[key] = limit
        evaluate.append(values)
    if not changes:
        return recipe
    classes = f"{train.num_classes}/{val.num_classes if val else 0}/{test.num_classes if test else 0}"
    notes.append(f"fitted to the folder's train/val/test classes ({classes}): {', '.join(changes)}; "
                 f"set them with --set to choose otherwise")
    data = recipe.to_dict()
    data["train"], data["evaluate"] = config, evaluate
    return Recipe.from_dict(data, name=recipe.name)


def train_recipe(recipe: Recipe, run_dir: str | Path, device: str = "cpu", resume: bool = False,
                 overwrite: bool = False, progress: bool = True, data: PreparedData | None = None) -> TrainedRun:
    """Build the recipe's learner, train it into `run_dir`, and return it with its best weights loaded.
    Everything is checked (settings, data, episode shapes) before the run folder is touched. Under torchrun
    every process calls this and trains its share of each batch (see `kshot.distributed`); afterwards only
    the main process should evaluate and write results."""
    if data is None:
        recipe, data = prepare_recipe_data(recipe)
    train, val = data.train, data.val
    device = str(local_device(device))  # under torchrun, this process's own GPU
    if device != "cpu":
        train = train.to(device)
        val = val.to(device) if val is not None else None
    torch.manual_seed(recipe.train.seed)  # the same initial weights for the same recipe
    learner = build_learner(recipe.learner, train.image_shape, recipe.backbone, recipe.options)
    learner.input_contract = train.contract
    run_info = {"recipe": recipe.to_dict(), "commit": current_commit(), "bn_mode": recipe.bn_mode}
    trainer = Trainer(learner, recipe.train, run_dir, device=device, progress=progress, run_info=run_info,
                      augment=recipe.augment)
    history = trainer.fit(train, val, resume=resume, overwrite=overwrite)
    best, _ = load_learner(trainer.best_dir, map_location=device)
    return TrainedRun(best, Path(run_dir), history, trainer.train_seconds, trainer.step)


def evaluate_recipe(learner: Learner, recipe: Recipe, device: str = "cpu", bn_mode: str | None = None,
                    episodes: int | None = None, progress: bool = True, across_processes: bool = False
                    ) -> list[EvaluationResult]:
    """Evaluate on the recipe's test split for each of its evaluation settings (fixed, seeded episodes); under
    torchrun, `across_processes` has every process score its share of the episodes."""
    device = str(local_device(device))
    test = load_dataset(recipe.dataset, recipe.splits["test"], contract=getattr(learner, "input_contract", None))
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
    """Rows in the benchmark results format (accuracy, ci95 and ece in percent; ece None for regression)."""
    commit = current_commit()
    rows = []
    for setting, result in zip(recipe.evaluate, results):
        rows.append({"method": recipe.learner, "recipe": recipe.name, "dataset": result.dataset,
                     "ways": result.ways, "shots": result.shots, "queries": result.queries,
                     "episodes": result.episodes, "accuracy": round(result.accuracy, 3),
                     "ci95": round(result.ci95, 3) if math.isfinite(result.ci95) else None,
                     "ece": None if result.ece is None else round(result.ece, 3),
                     "paper": setting.paper, "bn_mode": result.bn_mode, "transductive": result.transductive,
                     "train_steps": steps,
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
