"""What `kshot predict --backbone NAME` gives a user on folders of real photos, with no meta-training.

Draws N-way K-shot episodes (Q queries a class, seeded) from the class folders of DATA (for instance the TEST
split of an assembled miniImageNet: DATA/test/<wnid>/*.jpg) and scores nearest-centroid classification over the
frozen features of a pretrained network, three ways on the same episodes: ProtoNet (squared Euclidean to the
class means), SimpleShot's L2N (features L2-normalised), and CL2N centred on the support set's own mean (as
SimpleShot centres on a base-class mean, which a network used as is does not have). Each variant is the kshot
learner's own `adapt` run on cached features: the frozen network maps each image to the same vector whatever
batch it is in, so caching changes nothing. The first `--api-episodes` episodes are also run end to end on the
files with the default variant, as `kshot predict` does (`FewShotModel.pretrained(NAME).adapt(files)
.predict(files)`), to check they give the same predictions and to time an episode.

The network was pretrained on ImageNet-1k, which contains every miniImageNet class (its test classes
included), so these are NOT few-shot miniImageNet results: they say what a user gets on photos of classes
the network has already seen. Writes rows to benchmarks/results/pretrained-photos.json.

    python benchmarks/pretrained_photos.py /work/data/miniimagenet/test --images-per-class 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import RESULTS, write_report  # noqa: E402

from kshot import FewShotModel  # noqa: E402
from kshot.data.folder import class_folders, image_files  # noqa: E402
from kshot.evaluation import mean_ci95  # noqa: E402
from kshot.learners import build_learner  # noqa: E402
from kshot.pipeline import current_commit, device_name  # noqa: E402
from kshot.pretrained import build_pretrained, pretrained_network  # noqa: E402

VARIANTS = {"protonet": ("protonet", {}), "simpleshot-l2n": ("simpleshot", {"normalize": "l2n"}),
            "cl2n-support-mean": None}
"""Nearest-centroid variants compared: kshot learner and options (None: centred on the support mean, below)."""
DEFAULT = "simpleshot-l2n"
"""The variant `FewShotModel.pretrained` and `kshot predict --backbone` use (the best measured here)."""


def class_files(root: Path, per_class: int | None, seed: int) -> tuple[list[str], list[list[Path]]]:
    """Class names and, for each class, its image files (a seeded sample of `per_class` of them if given)."""
    generator = torch.Generator().manual_seed(seed)
    names, files = [], []
    for folder in class_folders(root):
        paths = image_files(folder)
        if per_class is not None and per_class < len(paths):
            picks = torch.randperm(len(paths), generator=generator)[:per_class].sort().values.tolist()
            paths = [paths[i] for i in picks]
        names.append(folder.name)
        files.append(paths)
    return names, files


def extract_features(name: str, files: list[list[Path]], cache: Path | None, batch: int = 50) -> list[torch.Tensor]:
    """Features [M, D] of every class's files through the frozen network and its contract (cached on disk)."""
    key = {"backbone": name, "files": [[str(p) for p in paths] for paths in files]}
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == json.dumps(key):
            return saved["features"]
    contract = pretrained_network(name).contract
    network = build_pretrained(name)
    features, start = [], time.perf_counter()
    with torch.inference_mode():
        for c, paths in enumerate(files):
            chunks = [network(contract.to_model(contract.decode_files(paths[i:i + batch])))
                      for i in range(0, len(paths), batch)]
            features.append(torch.cat(chunks))
            print(f"features of class {c + 1}/{len(files)} ({time.perf_counter() - start:.0f} s)", flush=True)
    if cache is not None:
        torch.save({"key": json.dumps(key), "features": features}, cache)
    return features


def draw_episodes(sizes: list[int], ways: int, shots: int, queries: int, count: int, seed: int
                  ) -> list[tuple[list[int], list[list[int]]]]:
    """Seeded episodes: `ways` distinct classes, and for each `shots` + `queries` distinct image positions."""
    generator = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(count):
        classes = torch.randperm(len(sizes), generator=generator)[:ways].tolist()
        picks = [torch.randperm(sizes[c], generator=generator)[:shots + queries].tolist() for c in classes]
        episodes.append((classes, picks))
    return episodes


def support_centred(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """CL2N with the support set's mean feature as the centre: logits of `query`."""
    from kshot.learners.metric import class_means, squared_euclidean

    centre = support.mean(0)
    normed = torch.nn.functional.normalize(support - centre, dim=-1)
    centroids = class_means(normed, support_y, int(support_y.max()) + 1)
    return -squared_euclidean(torch.nn.functional.normalize(query - centre, dim=-1), centroids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a folder with one sub-folder of photos per class (e.g. miniImageNet's test/)")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--images-per-class", type=int, help="a seeded sample of each class's images (default: all)")
    parser.add_argument("--api-episodes", type=int, default=5, help="episodes also run end to end on the files")
    parser.add_argument("--cache", type=Path, help="a file to keep the features in between runs (outside the repo)")
    parser.add_argument("--dataset-name",
                        default="miniImageNet test classes (ImageNet-1k classes the network has seen)")
    parser.add_argument("--output", default=str(RESULTS / "pretrained-photos.json"))
    args = parser.parse_args()

    network = pretrained_network(args.backbone)
    print(network.note())
    names, files = class_files(Path(args.data), args.images_per_class, seed=0)
    cached = args.cache is not None and args.cache.exists()
    start = time.perf_counter()
    features = extract_features(args.backbone, files, args.cache)
    feature_seconds = None if cached else round(time.perf_counter() - start, 1)
    dim = features[0].shape[1]
    learners = {label: build_learner(spec[0], (dim,), nn.Identity(), spec[1]).eval()
                for label, spec in VARIANTS.items() if spec is not None}
    rows, commit = [], current_commit()
    for shots in args.shots:
        episodes = draw_episodes([len(f) for f in features], args.ways, shots, args.queries, args.episodes, seed=0)
        scores: dict[str, list[float]] = {label: [] for label in VARIANTS}
        for classes, picks in episodes:
            chosen = [features[c][p] for c, p in zip(classes, picks)]
            support = torch.cat([f[:shots] for f in chosen])
            query = torch.cat([f[shots:] for f in chosen])
            support_y = torch.arange(args.ways).repeat_interleave(shots)
            query_y = torch.arange(args.ways).repeat_interleave(args.queries)
            with torch.no_grad():
                for label, learner in learners.items():
                    logits = learner.adapt(support, support_y)(query)
                    scores[label].append(100 * (logits.argmax(-1) == query_y).double().mean().item())
                logits = support_centred(support, support_y, query)
                scores["cl2n-support-mean"].append(100 * (logits.argmax(-1) == query_y).double().mean().item())
        # End to end on the files, as `kshot predict --backbone` does (its default learner).
        model = FewShotModel.pretrained(args.backbone, device="cpu")
        assert model.learner.name == VARIANTS[DEFAULT][0]
        same, seconds = 0, []
        for index, (classes, picks) in enumerate(episodes[:args.api_episodes]):
            support_files = [files[c][i] for c, p in zip(classes, picks) for i in p[:shots]]
            query_files = [files[c][i] for c, p in zip(classes, picks) for i in p[shots:]]
            labels = [names[c] for c in classes for _ in range(shots)]
            tick = time.perf_counter()
            predicted = model.adapt(support_files, labels).predict(query_files)
            seconds.append(time.perf_counter() - tick)
            truth = [names[c] for c in classes for _ in range(args.queries)]
            score = 100 * sum(a == b for a, b in zip(predicted, truth)) / len(truth)
            same += abs(score - scores[DEFAULT][index]) < 1e-9
        per_episode = sum(seconds) / max(len(seconds), 1)
        load = os.getloadavg()[0]  # the machine's 1-minute load while the episodes were timed
        print(f"{args.ways}-way {shots}-shot: end to end on the files, {same} of {len(seconds)} episodes scored as "
              f"on cached features; {per_episode:.2f} s an episode ({args.ways * (shots + args.queries)} images, "
              f"{torch.get_num_threads()} threads, load average {load:.1f})")
        for label, values in scores.items():
            accuracy, ci95 = mean_ci95(values)
            print(f"  {label:20s} {accuracy:.2f} +- {ci95:.2f}")
            rows.append({
                "method": f"pretrained {args.backbone} + {label}", "recipe": "", "dataset": args.dataset_name,
                "ways": args.ways, "shots": shots, "queries": args.queries, "episodes": args.episodes,
                "accuracy": round(accuracy, 3), "ci95": round(ci95, 3), "bn_mode": "inference",
                "train_steps": 0, "train_seconds": 0.0, "device": device_name("cpu"), "commit": commit,
                "pretrained_on": network.pretrained_on,
                "caveat": "the network was pretrained on ImageNet-1k, which contains these classes: NOT a few-shot "
                          "miniImageNet result, only what a user gets on photos of classes the network has seen",
                "images_per_class": args.images_per_class or "all", "classes": len(names),
                "seconds_per_episode_end_to_end": round(per_episode, 3), "end_to_end_episodes": len(seconds),
                "end_to_end_matches": same, "feature_seconds": feature_seconds,
                "load_average": round(load, 2),
                "command": f"python benchmarks/pretrained_photos.py DATA --images-per-class {args.images_per_class}"
                           if args.images_per_class else "python benchmarks/pretrained_photos.py DATA"})
    output = Path(args.output)
    output.write_text(json.dumps(rows, indent=2) + "\n")
    if output.resolve().parent == RESULTS.resolve():
        write_report()


if __name__ == "__main__":
    main()
