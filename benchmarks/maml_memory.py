"""Peak memory of one MAML meta-step (loss + backward) on ResNet-12, 5-way 1-shot, measured at sizes the machine
can hold, against the estimate of `kshot.backbones.memory` (the bound's formula, fitted to these rows).

Each configuration runs in a fresh process. CPU: growth of the resident set during the step (sampled every 0.5 ms,
and the process's ru_maxrss); CUDA: torch.cuda.max_memory_allocated (None: out of memory). Rows keep what the
formula needs (activations of one image, parameters, images, steps, tasks alive), so the report recomputes the
estimate with the current coefficients.

    python benchmarks/maml_memory.py                             # CPU: small widths and images (about 2 minutes)
    python benchmarks/maml_memory.py --sweep cpu-large           # CPU: full widths, one task (needs ~10 GB free)
    python benchmarks/maml_memory.py --device cuda --sweep gpu   # full widths at 84x84, on a lent GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "maml_memory"
TITLE = "MAML memory on ResNet-12 (one meta-step, 5-way 1-shot): measured against the bound's estimate"
FULL, EIGHTH = (64, 160, 320, 640), (8, 20, 40, 80)

# (widths, image size, inner steps, queries a class, tasks, MAML options); backward is whole_batch unless the options
# say otherwise (all tasks' graphs alive: what the formula's tasks_alive counts)
SWEEPS: dict[str, list[tuple[tuple[int, ...], int, int, int, int, dict[str, Any]]]] = {
    "cpu": [
        *[(EIGHTH, size, 5, 15, 1, {}) for size in (16, 24, 32, 48, 64)],
        *[(tuple(w * k for w in EIGHTH), 32, 5, 15, 1, {}) for k in (2, 4)],
        *[(EIGHTH, 32, steps, 15, 1, {}) for steps in (1, 2, 3)],
        *[(EIGHTH, 32, 5, queries, 1, {}) for queries in (1, 5)],
        (EIGHTH, 32, 5, 15, 2, {}),
        ((16, 40, 80, 160), 48, 5, 15, 1, {}),
        ((16, 40, 80, 160), 48, 5, 15, 2, {"backward": "per_task"}),
        ((16, 40, 80, 160), 48, 5, 15, 2, {"first_order": True}),
    ],
    "cpu-large": [  # full-size networks, one task: minutes and up to about 10 GB
        (FULL, 42, 5, 15, 1, {}),
        ((32, 80, 160, 320), 84, 5, 15, 1, {}),
        (FULL, 84, 1, 15, 1, {}),
        (FULL, 84, 5, 15, 1, {}),
    ],
    "gpu": [
        *[(FULL, 84, steps, 15, 1, {}) for steps in (1, 2, 3, 5)],
        (FULL, 84, 5, 1, 1, {}),
        (FULL, 84, 5, 5, 1, {}),
        (FULL, 84, 5, 15, 2, {}),
        (FULL, 84, 5, 15, 4, {}),
        (FULL, 84, 5, 15, 4, {"backward": "per_task"}),
        (FULL, 84, 5, 15, 4, {"first_order": True}),
        ((32, 80, 160, 320), 84, 5, 15, 1, {}),
        ((32, 80, 160, 320), 84, 5, 15, 4, {}),
        (FULL, 42, 5, 15, 4, {}),
    ],
}


def probe(widths: list[int], size: int, steps: int, queries: int, tasks: int, options: dict[str, Any],
          device: str) -> dict[str, Any]:
    """One meta-step's peak memory (MB) in this process, and the inputs of the bound's formula."""
    from kshot.backbones.memory import activation_elements
    from kshot.episode import Episode
    from kshot.learners import build_learner

    torch.manual_seed(0)
    ways, shots = 5, 1
    learner = build_learner("maml", (3, size, size), {"name": "resnet12", "widths": widths},
                            {"ways": ways, "inner_steps": steps, "inner_lr": 0.01, "strategy": "loop",
                             "backward": "whole_batch", **options})
    learner = learner.to(device).train()
    labels = torch.arange(ways)
    batch = Episode(torch.randn(tasks, ways * shots, 3, size, size), labels.repeat_interleave(shots).repeat(tasks, 1),
                    torch.randn(tasks, ways * queries, 3, size, size),
                    labels.repeat_interleave(queries).repeat(tasks, 1), labels.repeat(tasks, 1)).to(device)
    row = {"backbone": "resnet12", "widths": widths, "image_size": size, "inner_steps": steps, "ways": ways,
           "shots": shots, "queries": queries, "tasks": tasks, "options": options,
           "tasks_alive": learner.tasks_alive(torch.device(device), tasks),
           "first_order": bool(options.get("first_order")),
           "params": sum(p.numel() for p in learner.parameters()),
           "activations": activation_elements(learner.backbone, (3, size, size))}

    def step() -> None:
        loss, _ = learner.loss(batch)
        loss.backward()

    if not device.startswith("cuda"):
        return {**row, "peak_mb": peak_during(step)}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        step()
        torch.cuda.synchronize()
        return {**row, "peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}
    except torch.cuda.OutOfMemoryError:
        return {**row, "peak_mb": None, "free_mb": torch.cuda.mem_get_info()[1] / 2**20}


def peak_during(run: Any, kernel_peak: bool = True) -> float:
    """Growth of the resident set in MB while `run()` executes, sampled every 0.5 ms by a thread; with
    `kernel_peak`, also the kernel's ru_maxrss (which catches a spike between two samples, but is the peak of the
    whole process so far, so it suits a fresh process), else the resident set once `run()` has returned.
    benchmarks/maml_growth.py and maml_speed.py measure with it too."""
    before = resident_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    done.set()
    sampler.join()
    end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if kernel_peak else resident_mb()  # kB
    return max(peak[0], end) - before


def resident_mb() -> float:
    """The resident set size of this process in MB (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def estimate_mb(row: dict[str, Any]) -> float:
    """The bound's estimate for a row, with the current coefficients."""
    from kshot.backbones.memory import maml_memory_bytes

    return maml_memory_bytes(row["activations"], row["params"], row["ways"] * row["shots"],
                             row["ways"] * row["queries"], row["inner_steps"], row["tasks_alive"],
                             row["first_order"]) / 2**20


def section(rows: list[dict[str, Any]]) -> str:
    """Markdown table: measured peak against the estimate, per configuration."""
    lines = ["| widths | image | inner steps | queries a class | tasks | options | measured MB | estimate MB | "
             "estimate / measured | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        estimate = estimate_mb(r)
        measured = "out of memory" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        ratio = "" if r["peak_mb"] is None else f"{estimate / r['peak_mb']:.2f}"
        options = ", ".join(f"{k}: {v}" for k, v in r["options"].items()) or "second order"
        lines.append(f"| {'-'.join(map(str, r['widths']))} | {r['image_size']} | {r['inner_steps']} | {r['queries']} | "
                     f"{r['tasks']} | {options} | {measured} | {estimate:.0f} | {ratio} | {r['device']} |")
    from report import commands_block

    return "\n".join(lines + commands_block(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # JSON of one configuration, run in this process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(*json.loads(args.probe), device=args.device)))
        return
    found = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=HERE)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({args.threads} thread(s))"
    rows = []
    for config in SWEEPS[args.sweep]:
        result = subprocess.run([sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
                                 "--probe", json.dumps(config)], capture_output=True, text=True, cwd=HERE)
        if result.returncode:
            print(result.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row.update(device=device, commit=found.stdout.strip() or "unknown", torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"),
                   command=f"python benchmarks/maml_memory.py --device {args.device} --sweep {args.sweep}")
        print(json.dumps({**row, "estimate_mb": round(estimate_mb(row), 1)}), flush=True)
        rows.append(row)
    out = Path(args.out) / f"{RESULT_PREFIX}-{args.sweep}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
