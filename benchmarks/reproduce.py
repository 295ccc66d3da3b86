"""Train and evaluate recipes, writing result rows to benchmarks/results/<recipe>.json and refreshing
BENCHMARKS.md.  Example:  python benchmarks/reproduce.py protonet-omniglot-1shot --device cuda"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import RESULTS, write_report  # noqa: E402

from kshot.distributed import is_main_process, process_group  # noqa: E402
from kshot.pipeline import evaluate_recipe, result_rows, train_recipe  # noqa: E402
from kshot.recipe import load_recipe  # noqa: E402


def main() -> None:
    from kshot.allocator import tune_malloc

    tune_malloc()  # as the kshot command does (kshot/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipes", nargs="+", help="recipe names or YAML files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--runs", default="runs/benchmarks", help="folder for the training runs")
    parser.add_argument("--tag", default="", help="suffix for the results file name (e.g. cpu-budget)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    with process_group(args.device):  # under torchrun, every process trains and evaluates its share
        for name in args.recipes:
            recipe = load_recipe(name, args.sets)
            stem = recipe.name + (f"-{args.tag}" if args.tag else "")
            run = train_recipe(recipe, Path(args.runs) / stem, device=args.device, resume=args.resume,
                               overwrite=not args.resume, progress=not args.no_progress)
            results = evaluate_recipe(run.learner, recipe, device=args.device,
                                      progress=not args.no_progress and is_main_process(), across_processes=True)
            if not is_main_process():
                continue
            rows = result_rows(recipe, results, run.train_seconds, run.steps, args.device)
            for row, result in zip(rows, results):
                row["command"] = "python benchmarks/reproduce.py " + " ".join(sys.argv[1:])
                print(result.summary(), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
        if is_main_process():
            write_report()


if __name__ == "__main__":
    main()
