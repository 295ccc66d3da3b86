"""glibc malloc settings against ProtoNet training speed on this CPU (issue: kernel time from page faults).

Each variant trains the protonet-omniglot-1shot setting (60-way 1-shot 5-query episodes, Conv-4, 28x28) for
--steps steps in a fresh process, and reports steps/s, minor page faults per step and user/system CPU seconds.
Variants: glibc's defaults; kshot's `tune_malloc()` (mallopt, what the `kshot` command now applies); and the
environment variables MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=4294967296 (what any program,
a competitor's included, gets from the same setting). Rounds take turns; the median round is reported.

    python benchmarks/allocator.py --steps 40 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "allocator"
TITLE = "glibc malloc settings and ProtoNet training speed (Omniglot 60-way 1-shot 5-query, Conv-4)"
CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads({threads})
if {tuned}:
    from kshot.allocator import tune_malloc
    assert tune_malloc()
from kshot.data import omniglot
from kshot.learners import build_learner
from kshot.data.sampler import EpisodeSampler
train = omniglot("train", progress=False)
torch.manual_seed(0)
learner = build_learner("protonet", train.image_shape, {{"name": "conv4"}})
optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
sampler = EpisodeSampler(train, 60, 1, 5, seed=0)
def step():
    loss, _ = learner.loss(sampler.sample())
    optimizer.zero_grad(); loss.backward(); optimizer.step()
for _ in range(3):
    step()
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range({steps}):
    step()
seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"steps_per_s": {steps} / seconds, "minflt_per_step": (after.ru_minflt - before.ru_minflt) / {steps},
                  "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime}}))
"""
VARIANTS = {"glibc defaults": ({}, False), "kshot tune_malloc()": ({}, True),
            "MALLOC_* environment variables": ({"MALLOC_MMAP_THRESHOLD_": "268435456",
                                                "MALLOC_TRIM_THRESHOLD_": "4294967296"}, False)}


def section(rows: list[dict]) -> str:
    """The BENCHMARKS.md table for benchmarks/results/allocator.json."""
    lines = ["| variant | steps/s (median) | rounds | minor page faults / step | kernel share of CPU time | threads | "
             "load |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steps_per_s']} | {r['steps_per_s_all']} | {r['minflt_per_step']:,} | "
                     f"{100 * r['kernel_share']:.0f}% | {r['threads']} | {r['load']} |")
    lines += ["", "kshot's `tune_malloc()` is applied by the `kshot` command, `FewShotModel.fit` and the benchmark "
              "scripts; the environment-variable row is what any other program (a competitor's included) gains "
              "from the same setting."]
    from report import commands_block

    return "\n".join(lines + commands_block(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "allocator.json"))
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (env, tuned) in VARIANTS.items():
            environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
            environment["KSHOT_MALLOC_TUNING"] = "1"
            code = CHILD.format(threads=args.threads, tuned=tuned, steps=args.steps)
            out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                                 check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()[0]
    rows = []
    for name, runs in results.items():
        median = sorted(runs, key=lambda r: r["steps_per_s"])[len(runs) // 2]
        kernel = median["sys_s"] / (median["sys_s"] + median["user_s"])
        rows.append({"variant": name, "steps_per_s": round(median["steps_per_s"], 2),
                     "steps_per_s_all": [round(r["steps_per_s"], 2) for r in runs],
                     "minflt_per_step": round(median["minflt_per_step"]), "kernel_share": round(kernel, 3),
                     "threads": args.threads, "steps": args.steps, "load": round(load, 2),
                     "command": f"python benchmarks/allocator.py --steps {args.steps} --rounds {args.rounds} "
                                f"--threads {args.threads}"})
        print(f"{name:32s} {median['steps_per_s']:.2f} steps/s (rounds {rows[-1]['steps_per_s_all']}), "
              f"{median['minflt_per_step']:.0f} minor faults/step, kernel {100 * kernel:.0f}% of CPU time")
    print(f"1-minute load average at the end: {load:.2f} (2 cores); median of {args.rounds} rounds")
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
