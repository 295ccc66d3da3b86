"""Compare trained runs on exactly the same test episodes, and write the table to BENCHMARKS.md.

    python benchmarks/compare.py runs/benchmarks/matching-omniglot-1shot \\
        runs/benchmarks/relation-omniglot-1shot --settings 5x1,5x5,20x1,20x5 --episodes 1000 --tag omniglot
    python benchmarks/compare.py RUN RUN@tim RUN@bd-cspn RUN@pt-map RUN@laplacianshot --all-settings \\
        --settings 5x1,5x5,20x1,20x5 --tag omniglot-transductive

Each argument is a run folder (its checkpoints/best is used) or a checkpoint folder, optionally followed by
`@METHOD` to score that run's trained backbone with a transductive method instead of its own learner
(`RUN@tim`, `RUN@bd-cspn`, `RUN@pt-map`, `RUN@laplacianshot`; see kshot/learners/transductive.py): such rows
are labelled RUN@METHOD, have method METHOD and `transductive: true`, and the table says so in its
transductive column, since transductive figures (queries of an episode labelled together) are not comparable
with inductive ones. The test split is the one the runs were trained with (they must agree). A run (and
RUN@METHOD) is scored only on the settings its recipe evaluates (a 1-shot model on 1-shot settings, a 5-way MAML
head on 5-way ones) unless --all-settings is given; runs of one method that cover different settings
(matching-1shot, matching-5shot) share a row of the table.
One `EpisodeSet` per N-way K-shot setting, with the same
seed for every run, is built once and given to every learner; the dataset fingerprint and a digest of the
episodes' indices are printed and recorded, to show that the episodes were identical. Each row also records
the expected calibration error (ECE, 15 bins, all queries pooled; see kshot/calibration.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "comparison"
TITLE = "Comparison on identical test episodes"


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint to load for a run folder (its best checkpoint) or a checkpoint folder itself."""
    folder = Path(path)
    for candidate in (folder / "checkpoints" / "best", folder / "best", folder):
        if (candidate / "checkpoint.json").is_file():
            return candidate
    raise FileNotFoundError(f"{folder} is neither a run folder (with checkpoints/best) nor a checkpoint")


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"5x1,20x5" -> [(5, 1), (20, 5)]: (N-way, K-shot) pairs."""
    settings = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            ways, shots = (int(v) for v in part.lower().split("x"))
        except ValueError as error:
            raise ValueError(f"bad setting {part!r}: write N-way K-shot as NxK, e.g. 5x1,20x5") from error
        settings.append((ways, shots))
    if not settings:
        raise ValueError("give at least one NxK setting")
    return settings


def episodes_digest(episodes: Any) -> str:
    """A short hash of the class ids and positions of every episode: equal digests, identical episodes."""
    import numpy as np

    digest = hashlib.sha256()
    for indices in (episodes.classes, episodes.picks):
        digest.update(np.ascontiguousarray(np.asarray(indices), dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def run_label(info: dict[str, Any], folder: Path, taken: set[str]) -> str:
    """A readable, unique name for a run: the name of its run folder, or of its recipe."""
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    label = run_dir.name or (info.get("recipe") or {}).get("name", "run")
    if label in taken:
        label = f"{label} ({folder})"
    taken.add(label)
    return label


def split_method(run: str) -> tuple[str, str | None]:
    """"RUN@tim" -> ("RUN", "tim"); a run with no "@METHOD" suffix -> (run, None). A path that itself holds
    "@" is read as a path when the part after the last "@" is not a transductive method."""
    from kshot.learners.transductive import TRANSDUCTIVE

    path, at, method = str(run).rpartition("@")
    if not at:
        return str(run), None
    if method in TRANSDUCTIVE:
        return path, method
    if Path(run).exists():
        return str(run), None
    raise ValueError(f"{run!r}: unknown transductive method {method!r} after '@'; choose one of "
                     f"{', '.join(TRANSDUCTIVE)}")


def load_runs(runs: Sequence[str], device: str) -> list[tuple[str, Path, Any, dict[str, Any]]]:
    """(label, checkpoint folder, learner, checkpoint info) for each run; a run given as RUN@METHOD is the
    transductive METHOD on RUN's backbone (loaded once however many methods use it), labelled RUN@METHOD."""
    from kshot.learners.transductive import transductive_learner
    from kshot.training.checkpoint import load_learner

    loaded = []
    taken: set[str] = set()
    cache: dict[Path, tuple[str, Any, dict[str, Any]]] = {}
    for run in runs:
        path, method = split_method(run)
        folder = checkpoint_folder(path)
        if folder not in cache:
            learner, info = load_learner(folder, map_location=device)
            if "recipe" not in info:
                raise ValueError(f"{folder} does not say which dataset it was trained on (no recipe in its info)")
            cache[folder] = (run_label(info, folder, set()), learner, info)
        base, learner, info = cache[folder]
        label = base if method is None else f"{base}@{method}"
        if label in taken:
            label = f"{label} ({folder})"
        taken.add(label)
        if method is not None:
            learner = transductive_learner(learner, method, base=training_set(learner, method, info, label))
        loaded.append((label, folder, learner, info))
    return loaded


def training_set(learner: Any, method: str, info: dict[str, Any], label: str) -> Any:
    """The run's training split when `method` centres on the base-class mean and the run kept none (a
    ProtoNet under LaplacianShot), for `transductive_learner` to compute the mean from; else None."""
    from kshot.data.registry import load_dataset
    from kshot.learners.transductive import BASE_MEAN_IMAGES, needs_base_mean

    if not needs_base_mean(learner, method):
        return None
    recipe = info["recipe"]
    split = recipe.get("splits", {}).get("train", "train")
    print(f"{label}: {learner.name} keeps no base-class mean feature; computing it from "
          f"{BASE_MEAN_IMAGES:,} images (at most) of the {split} split", flush=True)
    return load_dataset(recipe["dataset"], split, contract=getattr(learner, "input_contract", None), augment=True)


def recipe_settings(info: dict[str, Any]) -> set[tuple[int, int]] | None:
    """The (N-way, K-shot) settings a run's recipe evaluates, or None if it names none (then: any)."""
    evaluate = (info.get("recipe") or {}).get("evaluate") or []
    return {(int(e["ways"]), int(e["shots"])) for e in evaluate} or None


def weights_digest(folder: Path) -> str:
    """A short hash of a checkpoint's weights file: equal digests, the same trained model."""
    from kshot.training.checkpoint import WEIGHTS

    return hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()[:16]


def reusable(previous: Sequence[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """A previously written row for the same weights, episodes and batch-norm mode, if there is one."""
    keys = ("weights_digest", "episodes_digest", "dataset_fingerprint", "ways", "shots", "queries", "episodes",
            "seed", "bn_mode", "method")
    return next((p for p in previous if all(p.get(k) == row[k] for k in keys)
                 and p.get("method_options") == row.get("method_options")), None)


def shared_test_set(loaded: Sequence[tuple[str, Path, Any, dict[str, Any]]], device: str, split: str | None = None,
                    purpose: str = "compare runs of one dataset") -> tuple[Any, str]:
    """The test split that all `loaded` runs (`load_runs`) were trained with (or `split`), loaded once and put on
    `device`, and its fingerprint (printed); an error ending in `purpose` when the runs disagree on the dataset or
    the split, since identical episodes need one test set."""
    from kshot.data.registry import load_dataset

    specs = {json.dumps(info["recipe"]["dataset"], sort_keys=True) for *_, info in loaded}
    splits = {split or info["recipe"]["splits"].get("test", "test") for *_, info in loaded}
    if len(specs) > 1 or len(splits) > 1:
        raise ValueError(f"the runs were trained on different datasets or splits ({sorted(specs)}, "
                         f"{sorted(splits)}); {purpose}")
    dataset = load_dataset(json.loads(specs.pop()), splits.pop())
    fingerprint = dataset.fingerprint()
    print(f"test set {dataset.name}: fingerprint {fingerprint}, {dataset.num_classes} classes", flush=True)
    if device != "cpu":
        dataset = dataset.to(device)
    return dataset, fingerprint


def fixed_episodes(dataset: Any, ways: int, shots: int, queries: int, episodes: int, seed: int) -> tuple[Any, str]:
    """The one `EpisodeSet` every run of a setting is scored on, and its digest (printed)."""
    from kshot.data.sampler import EpisodeSet

    episode_set = EpisodeSet(dataset, ways, shots, queries, episodes, seed=seed)
    digest = episodes_digest(episode_set)
    print(f"{ways}-way {shots}-shot: {episodes} episodes, seed {seed}, episodes digest {digest}", flush=True)
    return episode_set, digest


def scored(label: str, learner: Any, episode_set: Any, bn_mode: str, device: str, progress: bool) -> Any:
    """`kshot.evaluation.evaluate` of one run on the episode set, its accuracy, CI and ECE printed."""
    from kshot.evaluation import evaluate

    result = evaluate(learner, episode_set, bn_mode=bn_mode, device=device, progress=progress)
    print(f"  {label:40s} {result.accuracy:6.2f} +- {result.ci95:.2f}  ECE {ece_cell(result.as_row())}"
          f"  ({result.seconds:.0f} s)", flush=True)
    return result


def compare(runs: Sequence[str], settings: Sequence[tuple[int, int]], episodes: int = 1000, queries: int = 15,
            seed: int = 0, device: str = "cpu", split: str | None = None, bn_mode: str | None = None,
            progress: bool = True, all_settings: bool = False, previous: Sequence[dict[str, Any]] = ()
            ) -> list[dict[str, Any]]:
    """Evaluate every run on the same fixed episode sets; one result row per (run, setting) scored (each run
    on the settings its recipe evaluates, or on all of them with all_settings). A row of `previous` for the
    same weights and the same episodes is reused instead of evaluating again."""
    from kshot.pipeline import current_commit, device_name

    loaded = load_runs(runs, device)
    dataset, fingerprint = shared_test_set(loaded, device, split)
    rows = []
    commit, today = current_commit(), time.strftime("%Y-%m-%d")
    for ways, shots in settings:
        episode_set, digest = fixed_episodes(dataset, ways, shots, queries, episodes, seed)
        for label, folder, learner, info in loaded:
            declared = recipe_settings(info)
            if not all_settings and declared is not None and (ways, shots) not in declared:
                continue
            mode = bn_mode or info["recipe"].get("bn_mode", "inference")
            transductive = bool(getattr(learner, "transductive", False))
            key = {"weights_digest": weights_digest(folder), "episodes_digest": digest,
                   "dataset_fingerprint": fingerprint, "ways": ways, "shots": shots, "queries": queries,
                   "episodes": episodes, "seed": seed, "bn_mode": mode, "method": learner.name}
            if transductive:  # the method's settings, so that a row for other settings is not reused
                key["method_options"] = dict(learner.options)
            earlier = reusable(previous, key)
            if earlier is not None:
                print(f"  {label:40s} {earlier['accuracy']:6.2f} +- {earlier['ci95']:.2f}  ECE {ece_cell(earlier)}"
                      "  (reused)", flush=True)
                rows.append({**earlier, "run": label, "checkpoint": str(folder)})
                continue
            result = scored(label, learner, episode_set, mode, device, progress)
            rows.append({
                "method": learner.name, "transductive": result.transductive,
                **({"trained_as": info["model"]["learner"], "method_options": key["method_options"]}
                   if transductive else {}),
                "run": label, "checkpoint": str(folder), "dataset": dataset.name,
                "dataset_fingerprint": fingerprint, "episodes_digest": digest,
                "weights_digest": key["weights_digest"], "ways": ways, "shots": shots,
                "queries": queries, "episodes": episodes, "seed": seed, "accuracy": round(result.accuracy, 3),
                "ci95": round(result.ci95, 3), "ece": None if result.ece is None else round(result.ece, 3),
                "bn_mode": mode, "train_steps": info.get("step"),
                "train_seconds": round(info.get("train_seconds", 0.0), 1),
                "eval_seconds": round(result.seconds, 1), "device": device_name(device), "commit": commit,
                "date": today})
    return rows


def section(rows: list[dict[str, Any]]) -> str:
    """Markdown for BENCHMARKS.md: one table per comparison, runs as rows and settings as columns (accuracy
    columns, then one ECE column per setting; empty for rows written before ECE was recorded), with a
    transductive column (rows written before it existed were all inductive)."""
    parts = []
    for name in sorted({r.get("comparison", RESULT_PREFIX) for r in rows}):
        group = [r for r in rows if r.get("comparison", RESULT_PREFIX) == name]
        settings = sorted({(r["ways"], r["shots"]) for r in group})
        row_of = {id(r): table_row_name(r, group) for r in group}
        cells = {(row_of[id(r)], r["ways"], r["shots"]): r for r in group}
        first = group[0]
        lines = [f"### {name}", "",
                 f"Test set {first['dataset']} (fingerprint `{first['dataset_fingerprint']}`), "
                 f"{first['episodes']} episodes per setting, {first['queries']} queries a class, "
                 f"episode seed {first['seed']}: every "
                 f"run was scored on the same episodes (digests below). Device: {first['device']}.", "",
                 "| method | runs | transductive | steps of the evaluated checkpoint | its train time | "
                 + " | ".join(f"{w}-way {k}-shot" for w, k in settings) + " | "
                 + " | ".join(f"ECE % {w}-way {k}-shot" for w, k in settings) + " |",
                 "|---|---|---|---|---|" + "---|" * 2 * len(settings)]
        for name in dict.fromkeys(row_of[id(r)] for r in group):
            members = list({r["run"]: r for r in group if row_of[id(r)] == name}.values())
            values = [f"{cells[name, w, k]['accuracy']:.2f} +- {cells[name, w, k]['ci95']:.2f}"
                      if (name, w, k) in cells else "" for w, k in settings]
            values += [ece_cell(cells.get((name, w, k), {})) for w, k in settings]
            steps = " / ".join(str(r.get("train_steps", "")) for r in members)
            minutes = " / ".join(f"{(r.get('train_seconds') or 0) / 60:.1f}" for r in members)
            runs = ", ".join(r["run"] for r in members)
            transductive = "yes" if members[0].get("transductive") else "no"
            lines.append(f"| {members[0]['method']} | {runs} | {transductive} | {steps} | {minutes} min | "
                         + " | ".join(values) + " |")
        digests = {(r["ways"], r["shots"]): r["episodes_digest"] for r in group}
        lines += ["", "Episode digests: "
                  + ", ".join(f"{w}-way {k}-shot `{d}`" for (w, k), d in sorted(digests.items()))]
        commands = sorted({r["command"] for r in group if r.get("command")})
        lines += ["", "Command:", ""] + [f"- `{c}`" for c in commands]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def ece_cell(row: dict[str, Any]) -> str:
    """A row's ECE for a table cell, or an empty string when it has none (regression, or an older row)."""
    return "" if row.get("ece") is None else f"{row['ece']:.2f}"


def table_row_name(row: dict[str, Any], group: list[dict[str, Any]]) -> str:
    """The table row of a result: its method, unless two runs of that method scored the same setting (then
    the run's own name)."""
    rivals = {r["run"] for r in group if r["method"] == row["method"] and (r["ways"], r["shots"]) ==
              (row["ways"], row["shots"])}
    return row["method"] if len(rivals) == 1 else row["run"]


def main() -> None:
    from kshot.allocator import tune_malloc

    tune_malloc()  # as the kshot command does (kshot/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or checkpoint folders; RUN@METHOD scores RUN's backbone "
                        "with a transductive method (tim, bd-cspn, pt-map, laplacianshot)")
    parser.add_argument("--settings", default="5x1,5x5,20x1,20x5", help="N-way K-shot settings: 5x1,20x5")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", default=None, help="test split (default: the runs' recipe's test split)")
    parser.add_argument("--all-settings", action="store_true",
                        help="score every run on every setting, not only those its recipe evaluates")
    parser.add_argument("--bn-mode", choices=["inference", "transductive"], default=None)
    parser.add_argument("--tag", default="", help="suffix of the results file: comparison-<tag>.json")
    parser.add_argument("--reuse", action="store_true",
                        help="keep rows of the existing results file for unchanged weights and episodes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from report import RESULTS, write_report

    name = RESULT_PREFIX + (f"-{args.tag}" if args.tag else "")
    path = RESULTS / f"{name}.json"
    previous = json.loads(path.read_text()) if args.reuse and path.is_file() else []
    rows = compare(args.runs, parse_settings(args.settings), args.episodes, args.queries, args.seed,
                   args.device, args.split, args.bn_mode, progress=not args.no_progress,
                   all_settings=args.all_settings, previous=previous)
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:])
    for row in rows:
        row.update(comparison=name, command=command)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {path} and {write_report()}")


if __name__ == "__main__":
    main()
