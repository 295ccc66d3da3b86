"""The `kshot` command: train and evaluate recipes, predict on a folder of images, download datasets."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch

from kshot import __version__
from kshot.learners.transductive import TRANSDUCTIVE as TRANSDUCTIVE_METHODS
from kshot.recipe import RecipeError, load_recipe, recipe_names

if TYPE_CHECKING:
    from kshot.api import FewShotModel
    from kshot.recipe import Recipe


def _device(device: str | None) -> str:
    if device in (None, "auto"):
        from kshot.api import default_device

        return default_device().type
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    return device


def _overrides(sets: tuple[str, ...], data: str | None, data_root: str | None, archives: str | None) -> list[str]:
    overrides = []
    if data:  # your own folder replaces the recipe's whole dataset section; --set dataset.* refines it
        overrides.append(f"dataset={{name: folder, path: {json.dumps(str(Path(data).resolve()))}}}")
    overrides += list(sets)
    if data_root:
        overrides.append(f"dataset.root={json.dumps(data_root)}")
    if archives:
        overrides.append(f"dataset.archives={json.dumps(archives)}")
    return overrides


data_options = [
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override a recipe value, e.g. --set train.steps=500 --set train.ways=20."),
    click.option("--data", type=click.Path(exists=True, file_okay=False),
                 help="Use your own images: a folder with one sub-folder per class (or train/ val/ test/ inside)."),
    click.option("--data-root", type=click.Path(file_okay=False), help="Where datasets are cached ($KSHOT_DATA)."),
    click.option("--archives", type=click.Path(exists=True, file_okay=False),
                 help="Folder of local Omniglot archives to use instead of downloading ($KSHOT_OMNIGLOT_ARCHIVES)."),
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto."),
]


def with_data_options(function):
    for option in reversed(data_options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="kshot", message="%(prog)s %(version)s")
def cli() -> None:
    """kshot: few-shot learning and meta-learning on PyTorch."""


@cli.command("recipes")
def list_recipes() -> None:
    """List the recipes that ship with kshot."""
    for name in recipe_names():
        recipe = load_recipe(name)
        click.echo(f"{name:40s} {recipe.description}")


@cli.command()
@click.argument("recipe")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default runs/<recipe>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start again in an --out that already holds a run.")
@click.option("--no-eval", is_flag=True, help="Train only; skip the test evaluation.")
@click.option("--eval-episodes", type=int, help="Test episodes per setting (default: the recipe's, 1,000).")
@with_data_options
def train(recipe: str, out: str | None, resume: bool, overwrite: bool, no_eval: bool, eval_episodes: int | None,
          sets, data, data_root, archives, device) -> None:
    """Meta-train RECIPE (a shipped recipe name or a YAML file), then evaluate it on its test split.
    Under torchrun, every process trains and evaluates its share; the first one prints and writes."""
    from kshot.distributed import is_main_process, process_group
    from kshot.pipeline import evaluate_recipe, prepare_recipe_data, result_rows, train_recipe, write_results
    from kshot.recipe import overridden_keys

    overrides = _overrides(sets, data, data_root, archives)
    chosen = load_recipe(recipe, overrides)
    device = _device(device)
    run_dir = Path(out or Path("runs") / chosen.name)
    with process_group(device):
        say = click.echo if is_main_process() else (lambda message: None)
        # Everything is checked against the data before the run folder is touched.
        chosen, prepared = prepare_recipe_data(chosen, overridden_keys(overrides), with_test=not no_eval)
        for note in prepared.notes:
            say(f"note: {note}")
        say(f"training {chosen.learner} ({chosen.name}) on {device} into {run_dir}")
        run = train_recipe(chosen, run_dir, device=device, resume=resume, overwrite=overwrite, data=prepared)
        say(f"trained {run.steps} steps in {run.train_seconds:.0f} s; best checkpoint: {run_dir}/checkpoints/best")
        if no_eval or not chosen.evaluate:
            return
        results = evaluate_recipe(run.learner, chosen, device=device, episodes=eval_episodes,
                                  progress=is_main_process(), across_processes=True)
        if not is_main_process():
            return
        for result in results:
            click.echo(result.summary())
        path = write_results(run_dir, result_rows(chosen, results, run.train_seconds, run.steps, device))
        click.echo(f"results written to {path}")


@cli.command("evaluate")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--ways", type=int, default=5, show_default=True)
@click.option("--shots", type=int, default=1, show_default=True)
@click.option("--queries", type=int, default=15, show_default=True)
@click.option("--episodes", type=int, default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", default=None, help="Dataset split to test on (default: the run's test split).")
@click.option("--bn-mode", type=click.Choice(["inference", "transductive"]), default=None,
              help="Batch norm at test time (default: the mode the run was trained and validated with).")
@click.option("--transductive", "method", type=click.Choice(list(TRANSDUCTIVE_METHODS)), default=None,
              help="Label each episode's queries together with this transductive method on the run's backbone "
                   "(authors' default settings); the result says it is transductive.")
@with_data_options
def evaluate_command(checkpoint: str, ways: int, shots: int, queries: int, episodes: int, seed: int,
                     split: str | None, bn_mode: str | None, method: str | None, sets, data, data_root, archives,
                     device) -> None:
    """Evaluate a run folder or checkpoint on fixed, seeded test episodes; print accuracy +- 95% CI.
    Images are decoded with the model's own input contract; training-time rotations are never applied.
    With --transductive METHOD, the run's trained backbone is used by that method instead of its own learner."""
    from kshot.api import FewShotModel
    from kshot.data.registry import load_dataset
    from kshot.distributed import is_main_process, process_group
    from kshot.recipe import Recipe, apply_overrides
    from kshot.training.checkpoint import read_info

    device = _device(device)
    model = FewShotModel.load(checkpoint, device=device)
    folder = Path(checkpoint)
    info = read_info(folder / "checkpoints" / "best" if (folder / "checkpoints" / "best").is_dir() else folder)
    if "recipe" not in info and not data:
        raise click.UsageError("this checkpoint does not say which data it was trained on; pass --data FOLDER")
    saved = info.get("recipe") or {"learner": info["model"]["learner"], "dataset": {"name": "folder", "path": "."}}
    recipe = Recipe.from_dict(apply_overrides(saved, _overrides(sets, data, data_root, archives)))
    if method is not None:
        model = _transductive(model, method, recipe, say=click.echo if is_main_process() else lambda line: None)
    dataset = load_dataset(recipe.dataset, split or recipe.splits.get("test") or "test",
                           contract=model.input_contract)
    model.check_dataset(dataset)
    with process_group(device):  # under torchrun, each process scores its share of the episodes
        result = model.evaluate(dataset.to(device) if device != "cpu" else dataset, ways=ways, shots=shots,
                                queries=queries, episodes=episodes, seed=seed, bn_mode=bn_mode,
                                progress=is_main_process(), across_processes=True)
        if is_main_process():
            click.echo(result.summary())


def _transductive(model: FewShotModel, method: str, recipe: Recipe, say: Callable[[str], None]) -> FewShotModel:
    """`model`'s backbone with transductive `method`; the base-class mean, when the method centres on it and the
    run kept none (a ProtoNet), is computed from the run's training split."""
    from kshot.data.registry import load_dataset
    from kshot.learners.transductive import BASE_MEAN_IMAGES, needs_base_mean

    base = None
    if needs_base_mean(model.learner, method):
        split = recipe.splits.get("train") or "train"
        base = load_dataset(recipe.dataset, split, contract=model.input_contract, augment=True)
        say(f"note: this {model.learner.name} run keeps no base-class mean feature, which {method} centres on: "
            f"computing it from {min(BASE_MEAN_IMAGES, len(base)):,} images of the {split} split")
    say(f"note: transductive inference: {method} on the backbone of this {model.learner.name} run")
    return model.transductive(method, base=base)


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--backbone", metavar="NAME", help="Instead of CHECKPOINT: a pretrained network (efficientnet-lite0), "
              "used as is with no meta-training: nearest class centroid over its features.")
@click.option("--support", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder with one sub-folder of example images per class.")
@click.option("--query", "queries", type=click.Path(exists=True), required=True, multiple=True,
              help="Image file or folder of images to classify (repeatable).")
@click.option("--device", default="auto", show_default=True)
def predict(checkpoint: str | None, backbone: str | None, support: str, queries: tuple[str, ...],
            device: str) -> None:
    """Adapt a trained model (CHECKPOINT) or a pretrained network (--backbone NAME) to the classes in --support
    and classify the --query images, one line each. Files are decoded with the model's own input contract
    (size, channels, resize filter, polarity, normalisation), as at training."""
    from kshot.api import FewShotModel
    from kshot.data.folder import image_files

    if checkpoint is not None and backbone is not None:
        raise click.UsageError("give a trained CHECKPOINT or --backbone NAME, not both")
    if checkpoint is None and backbone is None:
        raise click.UsageError("give a trained CHECKPOINT, or --backbone NAME to use a pretrained network as is "
                               "(e.g. --backbone efficientnet-lite0)")
    if backbone is not None:
        from kshot.pretrained import pretrained_network

        model = FewShotModel.pretrained(backbone, device=_device(device))
        click.echo(f"note: {pretrained_network(backbone).note()}", err=True)
    else:
        model = FewShotModel.load(checkpoint, device=_device(device))
    classifier = model.adapt(support)
    files: list[Path] = []
    for query in map(Path, queries):
        files.extend(image_files(query) if query.is_dir() else [query])
    if not files:
        raise click.UsageError(f"no image files in {', '.join(queries)}")
    for file, label in zip(files, classifier.predict(files)):
        click.echo(f"{file}\t{label}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write (default RUN_DIR/curves.png).")
def plot(run_dir: str, out: str | None) -> None:
    """Plot a run's training loss and validation accuracy (+- 95% CI) against steps and time."""
    from kshot.plots import plot_run

    click.echo(f"wrote {plot_run(run_dir, out)}")


@cli.command()
@click.argument("dataset", type=click.Choice(["omniglot", "miniimagenet"]))
@click.option("--data-root", type=click.Path(file_okay=False), help="Where datasets are cached ($KSHOT_DATA).")
@click.option("--archives", type=click.Path(exists=True, file_okay=False),
              help="Use local archives instead of downloading (checked by contents).")
@click.option("--image-size", type=int, default=28, show_default=True)
def download(dataset: str, data_root: str | None, archives: str | None, image_size: int) -> None:
    """Download, verify and convert a dataset once, so training starts straight away. For miniimagenet,
    --archives is the source folder (default $KSHOT_MINIIMAGENET); its images cannot be downloaded."""
    if dataset == "miniimagenet":
        from kshot.data.miniimagenet import SPLITS, miniimagenet

        for split in SPLITS:
            click.echo(f"ready: {miniimagenet(split, root=data_root, source=archives)}")
        return
    from kshot.data.omniglot import load_omniglot

    data = load_omniglot(data_root, image_size=image_size, archives=archives)
    click.echo(f"ready: {data}")


USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, ValueError,
                                                 NotADirectoryError, PermissionError)
"""Mistakes a user can fix (bad settings, files, data, folders): one line and exit code 2."""


def main() -> None:
    """Entry point: turn every error into one clear line instead of a traceback (KSHOT_DEBUG=1 shows it)."""
    import os

    from kshot.allocator import tune_malloc
    from kshot.data.download import DownloadError
    from kshot.data.omniglot import OmniglotError
    from kshot.training.checkpoint import CheckpointError

    tune_malloc()  # keep per-step buffers instead of page-faulting them back every step (kshot/allocator.py)
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort as error:  # click turns Ctrl-C into Abort; keep what the trainer said
        cause = error.__context__
        click.echo(f"interrupted: {cause}" if isinstance(cause, KeyboardInterrupt) and str(cause) else "aborted",
                   err=True)
        sys.exit(130)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx is not None else "kshot"
        message = " ".join(error.format_message().split())
        click.echo(f"error: {message} (`{command} --help` lists the options)", err=True)
        sys.exit(2)
    except click.ClickException as error:
        click.echo(f"error: {' '.join(error.format_message().split())}", err=True)
        sys.exit(error.exit_code if error.exit_code != 1 else 2)
    except KeyboardInterrupt as error:  # TrainingInterrupted says where its checkpoint is and how to resume
        click.echo(f"interrupted: {error}" if str(error) else "interrupted", err=True)
        sys.exit(130)
    except Exception as error:
        if os.environ.get("KSHOT_DEBUG"):
            raise
        user_error = isinstance(error, USER_ERRORS + (DownloadError, OmniglotError, CheckpointError,
                                                      FloatingPointError, RecipeError))
        message = " ".join(str(error).split()) or type(error).__name__
        if user_error:
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
        click.echo(f"error: {type(error).__name__}: {message} (an unexpected failure inside kshot; rerun with "
                   f"KSHOT_DEBUG=1 for the traceback and report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
