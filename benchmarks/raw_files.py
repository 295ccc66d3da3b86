"""Raw image files against kshot's cached dataset: does a trained Omniglot model score the same on the raw PNG
files of the evaluation alphabets (decoded by its recorded input contract, no flags) as on the cached tensors?

Scores one fixed set of N-way K-shot episodes three ways: the cached dataset; the raw PNGs through the model's
contract (`kshot.data.image_folder(..., contract=model.input_contract)`, what `kshot evaluate --data` and
`kshot predict` do); and the raw PNGs with the pre-contract defaults (no inversion, bilinear resize), to show
what the contract prevents. The first `--api-episodes` episodes are also scored through
`FewShotModel.adapt(files).predict(files)` on file paths. Writes rows to benchmarks/results/raw-files-omniglot.json.

    python benchmarks/raw_files.py RUN_DIR --archives ../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import RESULTS, write_report  # noqa: E402

from kshot import FewShotModel  # noqa: E402
from kshot.data import EpisodeSet, image_folder, omniglot  # noqa: E402
from kshot.data.contract import InputContract  # noqa: E402
from kshot.pipeline import current_commit, device_name  # noqa: E402


def extract_evaluation_pngs(archives: Path, target: Path) -> dict[str, Path]:
    """The evaluation alphabets' PNGs as target/<Alphabet>~<characterNN>/*.png; returns class name -> folder."""
    folders: dict[str, Path] = {}
    with zipfile.ZipFile(archives / "images_evaluation.zip") as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if len(parts) != 4 or not parts[3].endswith(".png"):
                continue
            name = f"{parts[1]}/{parts[2]}"
            folder = folders.setdefault(name, target / f"{parts[1]}~{parts[2]}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / parts[3]).write_bytes(archive.read(member))
    return folders


def in_cached_order(dataset, names: list[str]):
    """`dataset` (classes named Alphabet~characterNN) with its classes in the cached dataset's order."""
    position = {n.replace("~", "/"): i for i, n in enumerate(dataset.base_names)}
    reordered = dataset.subset([position[n] for n in names], name=dataset.name)
    reordered.base_names = list(names)
    return reordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder or checkpoint of an Omniglot model")
    parser.add_argument("--archives", default=os.environ.get("KSHOT_OMNIGLOT_ARCHIVES"),
                        help="folder holding images_evaluation.zip ($KSHOT_OMNIGLOT_ARCHIVES)")
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--api-episodes", type=int, default=100)
    parser.add_argument("--output", default=str(RESULTS / "raw-files-omniglot.json"))
    args = parser.parse_args()
    if not args.archives:
        parser.error("give --archives (a folder holding images_evaluation.zip) or set KSHOT_OMNIGLOT_ARCHIVES")

    model = FewShotModel.load(args.run, device="cpu")
    contract = model.input_contract
    cached = omniglot("evaluation", image_size=contract.image_size, archives=args.archives, progress=False)
    rows, commit = [], current_commit()
    with tempfile.TemporaryDirectory() as folder:
        extract_evaluation_pngs(Path(args.archives), Path(folder))
        before = image_folder(folder, contract=InputContract(channels=1, image_size=contract.image_size))
        before.contract = None  # what kshot saw before contracts: tensors with nothing to check them against
        variants = {
            "cached tensors": cached,
            "raw PNG files, model's contract": in_cached_order(image_folder(folder, contract=contract),
                                                               cached.base_names),
            "raw PNG files, pre-contract defaults (no inversion, bilinear)": in_cached_order(before, cached.base_names),
        }
        identical = torch.equal(variants["raw PNG files, model's contract"].images, cached.images)
        print(f"raw PNGs decoded by the model's contract equal the cached tensors: {identical}")
        results = {}
        for label, dataset in variants.items():
            episodes = EpisodeSet(dataset, args.ways, args.shots, args.queries, args.episodes, seed=0)
            result = model.evaluate(episodes, progress=False)
            results[label] = result
            print(f"{label:62s} {result.accuracy:.2f} +- {result.ci95:.2f}")
            rows.append({"method": model.learner.name, "recipe": Path(args.run).name,
                         "dataset": f"omniglot-evaluation ({label})", "ways": args.ways, "shots": args.shots,
                         "queries": args.queries, "episodes": args.episodes, "accuracy": round(result.accuracy, 3),
                         "ci95": round(result.ci95, 3), "bn_mode": result.bn_mode, "train_seconds": 0.0,
                         "device": device_name("cpu"), "commit": commit,
                         "command": f"python benchmarks/raw_files.py {args.run} --archives ARCHIVES"})
        # The API on file paths: adapt(files, labels).predict(files), episode by episode.
        raw_root = Path(folder)
        names = cached.base_names
        episodes = EpisodeSet(cached, args.ways, args.shots, args.queries, args.episodes, seed=0)
        same = 0
        for index in range(min(args.api_episodes, args.episodes)):
            classes, picks = episodes.classes[index], episodes.picks[index]
            support, support_labels, query, query_labels = [], [], [], []
            for label, (c, positions) in enumerate(zip(classes.tolist(), picks.tolist())):
                files = sorted((raw_root / names[c].replace("/", "~")).glob("*.png"))
                for i, p in enumerate(positions):
                    (support if i < args.shots else query).append(files[p])
                    (support_labels if i < args.shots else query_labels).append(label)
            predicted = model.adapt(support, support_labels).predict(query)
            score = sum(int(a == b) for a, b in zip(predicted, query_labels)) / len(query_labels)
            same += abs(score - results["cached tensors"].per_episode[index]) < 1e-12
        print(f"adapt/predict on file paths: {same} of {min(args.api_episodes, args.episodes)} episodes scored "
              f"exactly as on the cached tensors")
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    write_report()


if __name__ == "__main__":
    main()
