"""Evaluation throughput against easyfsl (issue 12, item 4a): episodes per second and minor page faults per
episode when kshot's evaluator and easyfsl's score the same Conv-4 ProtoNet on the same fixed Omniglot test
episodes (1-shot, 15 queries a class; 5-way and 20-way), each evaluator in a fresh process of its own.

Variants (one process each; rounds take turns, the median round is reported):
- `kshot`: `kshot.evaluation.evaluate` as it runs by default (chunks of episodes per backbone pass, through the
  backbone's inference copy: batch norm folded, channels-last on the CPU; `kshot.inference`), after kshot's
  entry-point malloc tuning (`kshot.allocator.tune_malloc()`, what the `kshot` command applies).
- `kshot-untuned`: the same under glibc's malloc defaults (what a user's own script calling `evaluate` gets).
- `kshot-plain-backbone`, `kshot-per-episode` (not run unless asked, `--variants`): the batched path with the
  backbone as given (`fast_backbone=False`), and the per-episode path (`adapt` on each episode's images, as
  before the batched path), both tuned.
- `easyfsl`: easyfsl 1.5.0's `PrototypicalNetworks` on the same backbone module, fed by a torch DataLoader
  (num_workers 0, one process as kshot is) over easyfsl's `TaskSampler.episodic_collate_fn`, scored by easyfsl's
  `evaluate` loop, under glibc's malloc defaults.
- `easyfsl-malloc`: the same with MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=4294967296, the
  settings kshot's tuning applies, so that the comparison does not credit kshot with what any program gets from
  the same environment.

easyfsl cannot run as packaged without torchvision (not installable here): `easyfsl/methods/__init__.py` imports
every method, FEAT among them, which imports `easyfsl.modules`, which imports torchvision's ResNet blocks; and
`easyfsl/utils.py`, which holds `evaluate`, imports torchvision, matplotlib and pandas at its top. So the worker
loads easyfsl's own files from its wheel (`--easyfsl`, from `pip download easyfsl==1.5.0 --no-deps`) without
running those package `__init__`s: `methods/few_shot_classifier.py`, `methods/prototypical_networks.py`,
`methods/utils.py` (`compute_prototypes`), `datasets/few_shot_dataset.py`, `samplers/task_sampler.py`; and
`evaluate` / `evaluate_on_one_task` are copied below verbatim from `easyfsl/utils.py`. Its `TaskSampler.__init__`
fails under torch 2.13 (it calls `Sampler.__init__(data_source=None)`, which torch no longer takes), and it draws
its own random tasks, so a subclass sets the attributes the collate function reads and yields the item indices
of kshot's fixed episodes in TaskSampler's order (class by class, shots then queries). easyfsl's dataset is the
fastest it could be: every image already a float tensor in memory (no file decoding or transforms per item).
Both sides run torch 2.13.0 with the same thread count and the same backbone module (kshot's Conv-4 with the same
weights); both report accuracy, which must agree (same model, same episodes; easyfsl ranks by Euclidean
distance, kshot by its square).

    python benchmarks/eval_throughput.py --easyfsl /tmp/easyfsl/easyfsl-1.5.0-py3-none-any.whl \\
        [--episodes 1000] [--ways 5 20] [--threads 1] [--rounds 3] [--run RUN_FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "eval-throughput"
TITLE = "Evaluation throughput against easyfsl (Omniglot 1-shot 15-query, Conv-4 ProtoNet, one process each)"
SHOTS, QUERIES, WARM_UP = 1, 15, 20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
VARIANTS = {  # name: (evaluator, malloc environment variables, kshot tune_malloc(), allocator as reported)
    "kshot": ("kshot", {}, True, "kshot tune_malloc() (mallopt: mmap threshold 256 MiB, trim threshold 4 GiB)"),
    "kshot-untuned": ("kshot", {}, False, "glibc defaults"),
    "kshot-plain-backbone": ("kshot-plain-backbone", {}, True, "kshot tune_malloc()"),
    "kshot-per-episode": ("kshot-per-episode", {}, True, "kshot tune_malloc()"),
    "easyfsl": ("easyfsl", {}, False, "glibc defaults"),
    "easyfsl-malloc": ("easyfsl", MALLOC_ENV, False, " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())),
}
DEFAULT_VARIANTS = ("kshot", "kshot-untuned", "easyfsl", "easyfsl-malloc")


# ------------------------------------------------------------------------------------------------ easyfsl
def import_easyfsl(location: str) -> dict[str, Any]:
    """easyfsl's PrototypicalNetworks, FewShotDataset and TaskSampler from its wheel (or an unpacked folder
    holding the `easyfsl` package), without running the package `__init__`s that import torchvision."""
    import types

    sys.path.insert(0, location)
    for package in ("easyfsl", "easyfsl.methods", "easyfsl.datasets", "easyfsl.samplers"):
        module = types.ModuleType(package)
        module.__path__ = [f"{location}/{package.replace('.', '/')}"]
        sys.modules[package] = module
    from easyfsl.datasets.few_shot_dataset import FewShotDataset
    from easyfsl.methods.prototypical_networks import PrototypicalNetworks

    sys.modules["easyfsl.datasets"].FewShotDataset = FewShotDataset  # what task_sampler.py imports
    from easyfsl.samplers.task_sampler import TaskSampler

    return {"PrototypicalNetworks": PrototypicalNetworks, "FewShotDataset": FewShotDataset,
            "TaskSampler": TaskSampler, "file": sys.modules["easyfsl.methods.prototypical_networks"].__file__}


def evaluate_on_one_task(model, support_images, support_labels, query_images, query_labels):
    """easyfsl 1.5.0, easyfsl/utils.py, verbatim."""
    import torch

    model.process_support_set(support_images, support_labels)
    predictions = model(query_images).detach().data
    number_of_correct_predictions = (
        (torch.max(predictions, 1)[1] == query_labels).sum().item()
    )
    return number_of_correct_predictions, len(query_labels)


def easyfsl_evaluate(model, data_loader, device="cuda", use_tqdm=True, tqdm_prefix=None):
    """easyfsl 1.5.0, easyfsl/utils.py `evaluate`, verbatim (its comments left out)."""
    import torch
    from tqdm import tqdm

    total_predictions = 0
    correct_predictions = 0
    model.eval()
    with torch.no_grad():
        with tqdm(
            enumerate(data_loader),
            total=len(data_loader),
            disable=not use_tqdm,
            desc=tqdm_prefix,
        ) as tqdm_eval:
            for _, (
                support_images,
                support_labels,
                query_images,
                query_labels,
                _,
            ) in tqdm_eval:
                correct, total = evaluate_on_one_task(
                    model,
                    support_images.to(device),
                    support_labels.to(device),
                    query_images.to(device),
                    query_labels.to(device),
                )
                total_predictions += total
                correct_predictions += correct
                tqdm_eval.set_postfix(accuracy=correct_predictions / total_predictions)
    return correct_predictions / total_predictions


def easyfsl_loader(easyfsl: dict[str, Any], data: Any, episode_set: Any) -> Any:
    """A DataLoader as easyfsl's examples build one, over kshot's fixed episodes (see the module docstring)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    images, labels = data.all_images()  # every (image, class id), class by class, in within-class order
    images, labels = data.to_model(images), labels.tolist()
    first_item = np.concatenate([[0], np.cumsum(data.class_counts)])[:-1]

    class InMemory(easyfsl["FewShotDataset"]):
        def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
            return images[item], labels[item]

        def __len__(self) -> int:
            return len(labels)

        def get_labels(self) -> list[int]:
            return labels

    class FixedTasks(easyfsl["TaskSampler"]):
        def __init__(self) -> None:  # TaskSampler.__init__ fails under torch 2.13; set what the collate reads
            self.n_way, self.n_shot, self.n_query = episode_set.ways, episode_set.shots, episode_set.queries
            self.n_tasks = len(episode_set)

        def __iter__(self) -> Any:
            for classes, picks in zip(episode_set.classes, episode_set.picks, strict=True):
                yield (first_item[classes][:, None] + picks).reshape(-1).tolist()

    sampler = FixedTasks()
    return DataLoader(InMemory(), batch_sampler=sampler, num_workers=0, pin_memory=False,
                      collate_fn=sampler.episodic_collate_fn)


# ------------------------------------------------------------------------------------------------ workers
def load_data(args: argparse.Namespace) -> Any:
    from kshot.data import omniglot

    return omniglot("test", progress=False)


def load_model(args: argparse.Namespace, data: Any) -> Any:
    """The kshot ProtoNet (Conv-4): a trained run's when --run is given, else a fixed random initialisation."""
    import torch

    from kshot.learners import build_learner
    from kshot.training import load_learner

    if args.run:
        folder = Path(args.run)
        checkpoint = next((c for c in (folder / "checkpoints" / "best", folder / "best") if c.is_dir()), folder)
        learner, _ = load_learner(checkpoint)
        if learner.name != "protonet":
            raise SystemExit(f"--run must be a ProtoNet run, got a {learner.name} learner")
        return learner
    torch.manual_seed(0)
    return build_learner("protonet", data.image_shape, {"name": "conv4"})


def timed(run: Any, episodes: int) -> dict[str, Any]:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    accuracy = run()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"episodes_per_s": episodes / seconds, "seconds": seconds, "accuracy": accuracy,
            "minflt_per_episode": (after.ru_minflt - before.ru_minflt) / episodes,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime}


def worker(args: argparse.Namespace) -> None:
    evaluator, _, tune, _ = VARIANTS[args.worker]
    applied = False
    if tune:
        from kshot.allocator import tune_malloc

        applied = tune_malloc()
    import torch

    torch.set_num_threads(args.threads)
    from kshot.data.sampler import EpisodeSet

    data = load_data(args)
    learner = load_model(args, data)
    episodes = EpisodeSet(data, args.ways, SHOTS, QUERIES, args.episodes, seed=0)
    warm_up = EpisodeSet(data, args.ways, SHOTS, QUERIES, WARM_UP, seed=1)
    if evaluator == "easyfsl":
        easyfsl = import_easyfsl(args.easyfsl)
        model = easyfsl["PrototypicalNetworks"](learner.backbone)
        easyfsl_evaluate(model, easyfsl_loader(easyfsl, data, warm_up), device="cpu", use_tqdm=False)
        loader = easyfsl_loader(easyfsl, data, episodes)
        result = timed(lambda: 100 * easyfsl_evaluate(model, loader, device="cpu", use_tqdm=False), args.episodes)
        result["easyfsl_file"] = easyfsl["file"]
    else:
        from kshot.evaluation import evaluate

        options: dict[str, Any] = {"fast_backbone": False} if evaluator == "kshot-plain-backbone" else {}
        if evaluator == "kshot-per-episode":
            learner.works_on_features = False  # the per-episode path: adapt on each episode's images
        evaluate(learner, warm_up, progress=False, device="cpu", **options)
        result = timed(lambda: evaluate(learner, episodes, progress=False, device="cpu", **options).accuracy,
                       args.episodes)
    result.update(malloc_tuned=applied, threads=torch.get_num_threads())
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver
def run_variant(name: str, args: argparse.Namespace, ways: int, threads: int) -> dict[str, Any]:
    _, malloc_env, _, _ = VARIANTS[name]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | malloc_env
    environment.update(KSHOT_MALLOC_TUNING="1", OMP_NUM_THREADS=str(threads))
    command = [sys.executable, __file__, "--worker", name, "--ways", str(ways), "--threads", str(threads),
               "--episodes", str(args.episodes)] + (["--easyfsl", args.easyfsl] if args.easyfsl else []) + \
        (["--run", args.run] if args.run else [])
    out = subprocess.run(command, env=environment, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} ({ways}-way, {threads} threads) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def command_line(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/eval_throughput.py", "--easyfsl EASYFSL_WHEEL", f"--episodes {args.episodes}",
             "--ways " + " ".join(map(str, args.ways)), "--threads " + " ".join(map(str, args.threads)),
             f"--rounds {args.rounds}", "--variants " + " ".join(args.variants)]
    return " ".join(parts + ([f"--run {args.run}"] if args.run else []))


def summarise(name: str, runs: list[dict[str, Any]], ways: int, threads: int, args: argparse.Namespace,
              context: dict[str, Any]) -> dict[str, Any]:
    median = sorted(runs, key=lambda r: r["episodes_per_s"])[len(runs) // 2]
    cpu = median["user_s"] + median["sys_s"]
    return {"variant": name, "evaluator": VARIANTS[name][0], "allocator": VARIANTS[name][3], "ways": ways,
            "shots": SHOTS, "queries": QUERIES, "episodes": args.episodes, "threads": threads,
            "episodes_per_s": round(median["episodes_per_s"], 2),
            "episodes_per_s_all": [round(r["episodes_per_s"], 2) for r in runs],
            "minflt_per_episode": round(median["minflt_per_episode"], 1),
            "kernel_share": round(median["sys_s"] / cpu, 3) if cpu else None,
            "accuracy": round(median["accuracy"], 3), **context}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's speed against easyfsl's (and easyfsl's with the MALLOC_* variables) at the same setting."""
    for row in rows:
        for other in ("easyfsl", "easyfsl-malloc"):
            match = next((r for r in rows if r["variant"] == other and r["ways"] == row["ways"]
                          and r["threads"] == row["threads"]), None)
            if match is not None:
                row[f"ratio_vs_{other.replace('-', '_')}"] = round(row["episodes_per_s"] / match["episodes_per_s"], 2)


def section(rows: list[dict]) -> str:
    """BENCHMARKS.md's section for benchmarks/results/eval-throughput-*.json."""
    lines = ["| variant | allocator | N-way | threads | episodes/s (median) | rounds | x easyfsl | "
             "x easyfsl + MALLOC_* | minor faults / episode | kernel share | accuracy % | load | device | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ways"], r["threads"], r["variant"])):
        lines.append(f"| {r['variant']} | {r['allocator']} | {r['ways']} | {r['threads']} | {r['episodes_per_s']} | "
                     f"{r['episodes_per_s_all']} | {r.get('ratio_vs_easyfsl', '')} | "
                     f"{r.get('ratio_vs_easyfsl_malloc', '')} | {r['minflt_per_episode']:,} | "
                     f"{100 * (r['kernel_share'] or 0):.0f}% | {r['accuracy']:.2f} | {r.get('load', '')} | "
                     f"{r.get('device', '')} | {r.get('commit', '')} |")
    lines += ["", f"{rows[0]['episodes']:,} fixed episodes of {rows[0]['dataset']} (1-shot, 15 queries a class), "
              "the same for every variant; each variant in a fresh process, rounds taking turns. The accuracy "
              "column checks that both evaluators scored the same model on the same episodes. easyfsl's own "
              "files are run from its 1.5.0 wheel, its `evaluate` loop copied verbatim (torchvision, which its "
              "package imports, is not available here): see the docstring of `benchmarks/eval_throughput.py`."]
    from report import commands_block

    return "\n".join(lines + commands_block(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--easyfsl", help="easyfsl 1.5.0's wheel file (pip download easyfsl==1.5.0 --no-deps -d DIR) "
                                          "or a folder holding its `easyfsl` package")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--run", help="a trained ProtoNet run folder (default: a fixed random Conv-4)")
    parser.add_argument("--tag", default="cpu", help="results go to benchmarks/results/eval-throughput-TAG.json")
    parser.add_argument("--output", help="write the JSON rows here instead")
    parser.add_argument("--no-save", action="store_true", help="print only (for short sanity runs)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.ways, args.threads = args.ways[0], args.threads[0]
        worker(args)
        return
    location = Path(args.easyfsl or "")
    if any(VARIANTS[v][0] == "easyfsl" for v in args.variants) and \
            not (args.easyfsl and (location.is_file() or (location / "easyfsl").is_dir())):
        raise SystemExit("--easyfsl must name easyfsl 1.5.0's wheel (pip download easyfsl==1.5.0 --no-deps -d DIR) "
                         "or a folder holding its `easyfsl` package")
    from kshot.pipeline import current_commit

    rows: list[dict[str, Any]] = []
    for ways in args.ways:
        for threads in args.threads:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
            load_before = os.getloadavg()[0]
            for _ in range(args.rounds):
                for name in args.variants:
                    runs[name].append(run_variant(name, args, ways, threads))
                    last = runs[name][-1]
                    print(f"{ways}-way, {threads} thread(s), {name:20s} {last['episodes_per_s']:7.2f} episodes/s, "
                          f"{last['minflt_per_episode']:8.1f} minor faults/episode, accuracy {last['accuracy']:.2f}",
                          flush=True)
            context = {"dataset": "omniglot-test-28px", "device": "cpu", "commit": current_commit(),
                       "load": round((load_before + os.getloadavg()[0]) / 2, 2), "command": command_line(args),
                       "date": time.strftime("%Y-%m-%d")}
            rows += [summarise(name, group, ways, threads, args, context) for name, group in runs.items()]
    add_ratios(rows)
    for r in rows:
        print(f"{r['ways']:2d}-way {r['threads']} thread(s) {r['variant']:20s} {r['episodes_per_s']:7.2f} episodes/s "
              f"(rounds {r['episodes_per_s_all']}), x easyfsl {r.get('ratio_vs_easyfsl', '-')}, x easyfsl+MALLOC "
              f"{r.get('ratio_vs_easyfsl_malloc', '-')}, {r['minflt_per_episode']:,} minor faults/episode")
    if not args.no_save:
        path = Path(args.output) if args.output else HERE / "results" / f"{RESULT_PREFIX}-{args.tag}.json"
        path.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {path}; regenerate BENCHMARKS.md with python benchmarks/report.py")


if __name__ == "__main__":
    main()
