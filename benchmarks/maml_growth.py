"""Memory growth and time of the first MAML meta-batch, kshot's old default (one graph for the meta-batch,
`backward: whole_batch`) against its new one (`backward: auto`: each task backpropagated at once), for the Omniglot
recipes' shape: Conv-4 with batch norm, 28x28, 5-way 1-shot, meta-batch 32, one inner step of 0.4, 1 and 15
queries a class (random images), for MAML, first-order MAML, ANIL and Meta-SGD, with learn2learn's clone/adapt
loop (benchmarks/clone_adapt_baseline.py) as the reference.

Each configuration runs in a fresh process: the growth of its resident set during its first meta-batch (loss and
backward; sampled every 0.5 ms and the kernel's ru_maxrss), then the median wall and process-CPU time of
`--repeats` more meta-batches (loss, backward, Adam step). With `--rounds` above 1 the configurations take turns,
each round in new processes, so that a machine whose load changes affects all alike; each row keeps the load
average seen before and after it. Process-CPU time is the better guide on a shared machine with one thread: it
leaves out the time the process waited for a core.

kshot's entry points tune glibc malloc (kshot/allocator.py); so does this script unless --no-malloc-tuning, which
gives what a plain Python process sees (the figures of issue 12 were measured so).

    python benchmarks/maml_growth.py                         # 1 thread, 1 round (about 5 minutes on a quiet CPU)
    python benchmarks/maml_growth.py --rounds 3 --repeats 3  # the figures in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "maml_growth"
TITLE = ("MAML memory growth and time of a meta-batch, old default (whole-batch backward) against the new "
         "(per-task backward): Conv-4, Omniglot 5-way 1-shot, meta-batch 32")
LEARNERS = {"maml": ("maml", {}), "fomaml": ("maml", {"first_order": True}), "anil": ("anil", {}),
            "metasgd": ("metasgd", {})}
BACKWARDS = {"whole_batch": "old default: one graph for the meta-batch",
             "auto": "new default: each task backpropagated at once"}
BASELINE = "clone/adapt"


def setup(learner_name: str, queries: int, seed: int = 0) -> tuple[Any, Any]:
    """A Conv-4 learner of the Omniglot recipes (5-way, one inner step of 0.4) and a meta-batch of 32 random 28x28
    5-way 1-shot tasks with `queries` queries a class."""
    from kshot.data.dataset import ClassDataset
    from kshot.data.sampler import EpisodeSampler
    from kshot.learners import build_learner

    torch.manual_seed(seed)
    images = torch.randint(0, 256, (40 * 20, 1, 28, 28), dtype=torch.uint8)
    dataset = ClassDataset(images, torch.arange(0, 40 * 20 + 1, 20), [f"c{i}" for i in range(40)])
    batch = EpisodeSampler(dataset, 5, 1, queries, seed=seed).sample_batch(32)
    name, options = LEARNERS[learner_name if learner_name != BASELINE else "maml"]
    learner = build_learner(name, (1, 28, 28), {"name": "conv4"}, {"ways": 5, "inner_lr": 0.4, **options})
    return learner.train(), batch


def load_average() -> float:
    with open("/proc/loadavg") as loadavg:
        return float(loadavg.read().split()[0])


def probe(learner_name: str, backward: str, queries: int, repeats: int) -> dict[str, Any]:
    """In this (fresh) process: memory growth of the first meta-batch, then the median times of `repeats` more."""
    sys.path.insert(0, str(HERE))
    from clone_adapt_baseline import meta_batch_backward
    from maml_memory import peak_during

    learner, batch = setup(learner_name, queries)
    if learner_name == BASELINE:
        network = torch.nn.Sequential(learner.backbone, learner.head)

        def run() -> None:
            meta_batch_backward(network, batch, steps=1, lr=0.4)
    else:
        learner.options["backward"] = backward

        def run() -> None:
            loss, _ = learner.loss(batch)
            loss.backward()

    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    load_before = load_average()
    growth = peak_during(run)
    optimizer.step()
    walls, cpus = [], []
    for _ in range(repeats):
        optimizer.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        optimizer.step()
        walls.append(1000 * (time.perf_counter() - wall))
        cpus.append(1000 * (time.process_time() - cpu))
    return {"growth_mb": round(growth, 1), "ms": median(walls), "cpu_ms": median(cpus),
            "load": [load_before, load_average()]}


def median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 1) if values else None


def in_fresh_process(config: tuple[str, str, int], threads: int, repeats: int, tuned: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--probe", json.dumps(config), "--threads", str(threads),
               "--repeats", str(repeats)] + ([] if tuned else ["--no-malloc-tuning"])
    out = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    if out.returncode:
        raise RuntimeError(f"{config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(rows: list[dict]) -> str:
    """One line per learner and query count: the old and new defaults' growth and times, and clone/adapt's."""
    lines = ["| learner | queries a class | growth MB, whole batch (old default) | growth MB, per task (new default) | "
             "growth MB, clone/adapt | ms (CPU ms), whole batch | ms (CPU ms), per task | per task / whole batch, "
             "CPU time | load average | malloc tuned | device |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple[bool, str, int], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["malloc_tuned"], r["learner"], r["queries"]), {})[r["backward"]] = r
    for (tuned, name, queries), found in sorted(cells.items(), key=lambda item: (not item[0][0], *item[0][1:])):
        if name == BASELINE:
            continue
        old, new = found.get("whole_batch"), found.get("auto")
        base = cells.get((tuned, BASELINE, queries), {}).get(BASELINE)

        def growth(r: dict | None) -> str:
            return "" if r is None else f"{r['growth_mb']:.0f}"

        def times(r: dict | None) -> str:
            return "" if r is None or r["ms"] is None else f"{r['ms']:.0f} ({r['cpu_ms']:.0f})"

        ratio = f"{new['cpu_ms'] / old['cpu_ms']:.2f}" if old and new and old["cpu_ms"] and new["cpu_ms"] else ""
        loads = [x for r in (old, new) if r for x in r["load"]]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""
        first = new or old
        lines.append(f"| {name} | {queries} | {growth(old)} | {growth(new)} | {growth(base)} | {times(old)} | "
                     f"{times(new)} | {ratio} | {load} | {'yes' if first['malloc_tuned'] else 'no'} | "
                     f"{first['device']} |")
    first = rows[0]
    lines += ["", "Growth: of the resident set during the first meta-batch (loss and backward) in a fresh process. "
              f"Times: median of {first['repeats']} meta-batches (loss, backward, Adam step) after it"
              + (f", median of {first['rounds']} rounds in which the configurations take turns" if first["rounds"] > 1
                 else "") + "; process-CPU time in brackets, the better guide on a loaded machine. The two kshot "
              "paths compute the same meta-gradient (tests/test_gradient_learners.py); the per-task path returns a "
              "surrogate loss whose gradient is the meta-gradient it has already computed, so the trainer's "
              f"backward is a few multiplications. {first['date']}, commit {first['commit']}, torch {first['torch']}.",
              "", f"Command: `{first['command']}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed meta-batches after the first (median)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per configuration, taking turns")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 15])
    parser.add_argument("--learners", nargs="+", choices=list(LEARNERS), default=list(LEARNERS))
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # JSON [learner, backward, queries], run here
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        from kshot.allocator import tune_malloc

        tune_malloc()
    if args.probe:
        learner_name, backward, queries = json.loads(args.probe)
        print(json.dumps(probe(learner_name, backward, queries, args.repeats)))
        return
    from kshot.pipeline import current_commit

    configs = [(BASELINE, BASELINE, q) for q in args.queries] + \
        [(name, backward, q) for q in args.queries for name in args.learners for backward in BACKWARDS]
    found: dict[tuple[str, str, int], list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            found[config].append(in_fresh_process(config, args.threads, args.repeats, not args.no_malloc_tuning))
            print(json.dumps({"config": config, **found[config][-1]}), flush=True)
    command = (f"python benchmarks/maml_growth.py --threads {args.threads} --repeats {args.repeats} --rounds "
               f"{args.rounds} --queries {' '.join(map(str, args.queries))}"
               + (f" --learners {' '.join(args.learners)}" if args.learners != list(LEARNERS) else "")
               + (" --no-malloc-tuning" if args.no_malloc_tuning else ""))
    rows = []
    for (name, backward, queries), runs in found.items():
        rows.append({"learner": name, "backward": backward, "queries": queries,
                     "growth_mb": runs[0]["growth_mb"],  # the first round's: a fresh process, like the others
                     "ms": median([r["ms"] for r in runs if r["ms"] is not None]),
                     "cpu_ms": median([r["cpu_ms"] for r in runs if r["cpu_ms"] is not None]),
                     "growth_mb_rounds": [r["growth_mb"] for r in runs], "load": [x for r in runs for x in r["load"]],
                     "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
                     "malloc_tuned": not args.no_malloc_tuning, "device": f"cpu ({args.threads} thread(s))",
                     "torch": torch.__version__.split("+")[0], "commit": current_commit(),
                     "date": time.strftime("%Y-%m-%d"), "command": command})
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    suffix = "" if not args.no_malloc_tuning else "-plain-malloc"
    out = results / f"{RESULT_PREFIX}{suffix}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(section(rows))
    print(f"wrote {out}")
    if not args.no_report:
        from report import write_report

        print(f"wrote {write_report()}")


if __name__ == "__main__":
    main()
