"""Conv-4 training throughput as a fraction of this CPU's sgemm peak (issue 12, item 3), and where the rest goes.

1. Peak: the best float32 `torch.mm` rate on large square matrices (2048 and 4096; best of --rounds), per thread
   count: what this CPU's BLAS reaches on the ideal dense workload.
2. Work: the FLOPs of one ProtoNet training step (forward and backward) on Omniglot 28x28 episodes, counted by
   torch.utils.flop_counter.FlopCounterMode: protonet-omniglot-1shot.yaml's training episodes (60-way 1-shot
   5-query: 360 images) and 20-way ones (120 images).
3. Time: the best and median of --steps training steps (loss, backward, Adam step) after a warm-up, per layout
   variant: "nchw" (Conv-4 as kshot builds it by default), "channels_last" (backbone option channels_last: true),
   "compile" (torch.compile of the backbone, inductor; needs a C compiler, and its first step compiles for about a
   minute), "no-mkldnn" (torch.backends.mkldnn off: PyTorch's own convolutions). Achieved GFLOP/s = FLOPs / best
   step time; fraction = that / the peak on as many threads.
4. Breakdown (torch.profiler, self CPU time over --steps steps) by kind of operation: convolutions (forward and
   backward, oneDNN), batch norm, max-pool, ReLU, the rest; "convolutions alone" is the FLOPs over the
   convolutions' own time: the fraction the step would reach if every memory-bound operation were free.

kshot's entry points tune glibc malloc (kshot/allocator.py), and so does this script. Random images (timing does
not depend on them). Every row records the load average before and after it: on a shared machine compare rows
measured together, and rerun on a quiet one for the figures:

    python benchmarks/sgemm_fraction.py                                   # about 5 minutes on a quiet CPU
    python benchmarks/sgemm_fraction.py --variants nchw channels_last compile no-mkldnn   # the full account
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "sgemm-fraction"
TITLE = "Conv-4 training throughput as a fraction of this CPU's sgemm peak (ProtoNet, Omniglot 28x28)"
RESULTS_FILE = HERE / "results" / f"{RESULT_PREFIX}.json"
SHOTS, QUERIES = 1, 5  # protonet-omniglot-1shot.yaml's training episodes
VARIANTS = ("nchw", "channels_last", "compile", "no-mkldnn")
KINDS = {"convolution": ("convolution",), "batch norm": ("batch_norm",), "max-pool": ("max_pool",),
         "ReLU": ("relu", "threshold", "clamp_min")}


def load_average() -> float:
    with open("/proc/loadavg") as loadavg:
        return float(loadavg.read().split()[0])


def sgemm_peak(threads: int, rounds: int) -> dict[str, Any]:
    """The best float32 torch.mm GFLOP/s on 2048 and 4096 square matrices with `threads` intra-op threads."""
    torch.set_num_threads(threads)
    load = load_average()
    best: dict[int, float] = {}
    for n in (2048, 4096):
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)

        def product(a: torch.Tensor = a, b: torch.Tensor = b, out: torch.Tensor = out) -> None:
            torch.mm(a, b, out=out)

        product()
        seconds = min(timed(product) for _ in range(rounds))
        best[n] = 2 * n**3 / seconds / 1e9
    return {"kind": "peak", "threads": threads, "gflops": round(max(best.values()), 1),
            "by_size": {str(n): round(g, 1) for n, g in best.items()}, "load": [load, load_average()]}


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def episode(ways: int) -> Any:
    """A random ways-way 1-shot 5-query Omniglot-shaped episode (28x28, one channel)."""
    from kshot.data.dataset import ClassDataset
    from kshot.data.sampler import EpisodeSampler

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (ways * 20, 1, 28, 28), dtype=torch.uint8, generator=generator)
    dataset = ClassDataset(images, torch.arange(0, ways * 20 + 1, 20), [f"c{i}" for i in range(ways)])
    return EpisodeSampler(dataset, ways, SHOTS, QUERIES, seed=0).sample()


def learner_for(variant: str) -> Any:
    from kshot.learners import build_learner

    torch.manual_seed(0)
    backbone = {"name": "conv4", "channels_last": True} if variant == "channels_last" else {"name": "conv4"}
    learner = build_learner("protonet", (1, 28, 28), backbone).train()
    if variant == "compile":
        learner.backbone = torch.compile(learner.backbone)
    return learner


def variant_context(variant: str) -> contextlib.AbstractContextManager:
    return torch.backends.mkldnn.flags(enabled=False) if variant == "no-mkldnn" else contextlib.nullcontext()


def step_flops(ways: int) -> dict[str, float]:
    """FLOPs of one ProtoNet training step (loss and backward), by aten operation."""
    from torch.utils.flop_counter import FlopCounterMode

    learner, batch = learner_for("nchw"), episode(ways)
    with FlopCounterMode(display=False) as counter:
        learner.loss(batch)[0].backward()
    return {str(op): float(count) for op, count in counter.get_flop_counts()["Global"].items()}


def gradients(variant: str, ways: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The first step's gradient of every parameter (in float64), computed in `dtype`."""
    learner, batch = learner_for(variant), episode(ways)
    learner = learner.to(dtype)
    batch = type(batch)(batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype), batch.query_y,
                        batch.classes)
    with variant_context(variant):
        learner.loss(batch)[0].backward()
    return {name: p.grad.double() for name, p in learner.named_parameters()}


def gradient_error(found: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """The largest, over parameters, of max |error| / max |exact gradient|: float32's error against float64, where
    the convolutions' biases are left out (batch norm right after them makes their exact gradient zero, so
    their float32 gradient is rounding alone)."""
    return max(((found[n] - g).abs().max() / g.abs().max()).item() for n, g in exact.items()
               if not re.fullmatch(r".*encoder\.\d+\.0\.bias", n))


def training_steps(variant: str, ways: int, threads: int, steps: int, profile: bool
                   ) -> tuple[list[float], float, dict[str, float]]:
    """Times (s) of `steps` training steps after a warm-up, the warm-up's own time, and (with `profile`) the
    self CPU time (s) by kind of operation over `steps` more steps."""
    torch.set_num_threads(threads)
    learner, batch = learner_for(variant), episode(ways)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step() -> None:
        loss, _ = learner.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with variant_context(variant):
        warm_up = timed(step)
        times = [timed(step) for _ in range(steps)]
        kinds: dict[str, float] = {}
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                for _ in range(steps):
                    step()
            for event in profiler.key_averages():  # self times: every CPU microsecond counted once
                kind = next((k for k, parts in KINDS.items() if any(p in event.key for p in parts)), "other")
                kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    return times, warm_up, kinds


def section(rows: list[dict]) -> str:
    """Markdown: the peaks, then per episode size, thread count and variant the achieved rate and fraction, and
    the time breakdown."""
    peaks = {r["threads"]: r for r in rows if r["kind"] == "peak"}
    lines = ["| threads | sgemm peak GFLOP/s (torch.mm, 2048 / 4096) | load average |", "|---|---|---|"]
    for threads, r in sorted(peaks.items()):
        lines.append(f"| {threads} | {r['gflops']:.1f} ({r['by_size']['2048']:.1f} / {r['by_size']['4096']:.1f}) | "
                     f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    lines += ["", "| episode | threads | variant | GFLOP a step | best ms (median) | GFLOP/s | fraction of peak | "
              "convolutions alone | time: conv / BN / pool / ReLU / other | gradient error | load average |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "step"):
        kinds = r.get("seconds_by_kind") or {}
        total = sum(kinds.values())
        shares = " / ".join(f"{100 * kinds.get(k, 0.0) / total:.0f}%" for k in (*KINDS, "other")) if total else ""
        conv = f"{100 * r['conv_only_fraction']:.0f}%" if r.get("conv_only_fraction") else ""
        lines.append(f"| {r['ways']}-way 1-shot 5-query ({r['images']} images) | {r['threads']} | {r['variant']} | "
                     f"{r['gflop_per_step']:.2f} | {r['best_ms']:.0f} ({r['median_ms']:.0f}) | {r['gflops']:.1f} | "
                     f"{100 * r['fraction']:.0f}% | {conv} | {shares} | {r['gradient_error']:.0e} | "
                     f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    first = rows[0]
    lines += ["", "Peak: the best float32 torch.mm rate on square 2048 and 4096 matrices (MKL), per thread count. "
              "Step: ProtoNet's loss, backward and Adam step on one Conv-4 episode of 28x28 images "
              "(protonet-omniglot-1shot.yaml's 60-way 1-shot 5-query training episodes, and 20-way), FLOPs counted "
              "by torch.utils.flop_counter (forward and backward: convolutions, their backward, the distances); "
              "GFLOP/s from the best step, fraction = that / the peak on as many threads. Convolutions alone: "
              "the FLOPs over the convolutions' own self time in the profile (forward and backward): the fraction "
              "if batch norm, max-pool and ReLU, which do about 1% of the FLOPs but read and write every "
              "activation, cost nothing. Gradient error: of the first step's float32 gradients against float64 "
              "NCHW ones, the largest over parameters of max |error| / max |gradient| (the convolutions' biases "
              "left out: batch norm after them makes their gradient zero). "
              "Variants: nchw is kshot's default Conv-4; channels_last the backbone "
              "option of that name (faster, less precise batch norm: kshot/backbones/conv.py); compile "
              "torch.compile of the backbone (inductor); no-mkldnn PyTorch's own convolutions. glibc malloc tuned "
              f"as kshot's entry points do. {first['date']}, commit {first['commit']}, torch {first['torch']}.", "",
              f"Command: `{first['command']}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ways", type=int, nargs="+", default=[60, 20])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["nchw", "channels_last"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (and profiled ones)")
    parser.add_argument("--rounds", type=int, default=5, help="torch.mm runs per size for the peak")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    from kshot.allocator import tune_malloc
    from kshot.pipeline import current_commit

    tune_malloc()
    command = ("python benchmarks/sgemm_fraction.py --threads " + " ".join(map(str, args.threads)) + " --ways "
               + " ".join(map(str, args.ways)) + " --variants " + " ".join(args.variants)
               + f" --steps {args.steps}" + (" --no-profile" if args.no_profile else ""))
    common = {"torch": torch.__version__.split("+")[0], "commit": current_commit(), "date": time.strftime("%Y-%m-%d"),
              "command": command, "device": "cpu"}
    rows = []
    for threads in args.threads:
        rows.append({**sgemm_peak(threads, args.rounds), **common})
        print(json.dumps(rows[-1]), flush=True)
    peaks = {r["threads"]: r["gflops"] for r in rows}
    for ways in args.ways:
        flops = step_flops(ways)
        exact = gradients("nchw", ways, torch.float64)
        total = sum(flops.values())
        conv_flops = sum(v for k, v in flops.items() if "convolution" in k)
        for threads in args.threads:
            for variant in args.variants:
                load = load_average()
                times, warm_up, kinds = training_steps(variant, ways, threads, args.steps, not args.no_profile)
                error = gradient_error(gradients(variant, ways), exact)
                best = min(times)
                conv_seconds = kinds.get("convolution")
                rows.append({"kind": "step", "ways": ways, "images": ways * (SHOTS + QUERIES), "threads": threads,
                             "variant": variant, "gflop_per_step": round(total / 1e9, 3),
                             "flops_by_op": {k: round(v / 1e9, 4) for k, v in flops.items()},
                             "best_ms": round(1000 * best, 1),
                             "median_ms": round(1000 * sorted(times)[len(times) // 2], 1),
                             "warm_up_ms": round(1000 * warm_up, 1), "gflops": round(total / best / 1e9, 2),
                             "fraction": round(total / best / 1e9 / peaks[threads], 3),
                             "seconds_by_kind": {k: round(v, 4) for k, v in kinds.items()},
                             "conv_only_fraction": round(conv_flops / conv_seconds / 1e9 / peaks[threads], 3)
                             if conv_seconds else None,
                             "gradient_error": float(f"{error:.2g}"), "load": [load, load_average()], **common})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("flops_by_op", "command")}),
                      flush=True)
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(rows, indent=1) + "\n")
    print(section(rows))
    print(f"wrote {RESULTS_FILE}")
    if not args.no_report:
        from report import write_report

        print(f"wrote {write_report()}")


if __name__ == "__main__":
    main()
