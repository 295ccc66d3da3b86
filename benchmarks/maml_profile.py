"""Where a second-order MAML meta-batch spends its time on this device, and what two tempting speed-ups give.

Same workload as benchmarks/maml_speed.py (Conv-4, 5-way 1-shot, meta-batch 32, one inner step). Prints:
- the torch profiler's share of self time in convolution, pooling and batch-norm kernels (work any
  implementation of the same meta-gradient must do, whatever its task loop);
- --channels-last: the same meta-batch with channels-last activations and weights;
- --compile: `torch.compile` of the per-task meta-gradient written with nested `torch.func.grad`
  (the first call's compile time is printed separately).

    python benchmarks/maml_profile.py --threads 1 --queries 1 15 --channels-last --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_speed import setup  # noqa: E402

KERNELS = {"convolution": ("convolution", "conv2d"), "pooling": ("max_pool",), "batch norm": ("batch_norm",)}


def meta_batch_ms(run, repeats: int = 2) -> float:
    """Fastest of `repeats` timed calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return min(times)


def kernel_shares(run) -> dict[str, float]:
    """Share of the profiler's total self CPU time in each kernel family of KERNELS."""
    from torch.profiler import profile

    with profile() as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return {family: sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / total
            for family, keys in KERNELS.items()}


def compiled_meta_gradient(learner, batch):
    """A meta-batch through a compiled per-task meta-gradient (nested torch.func.grad); BN without running
    statistics, which a grad transform cannot update in place (they do not enter the meta-gradient)."""
    for module in learner.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.track_running_stats, module.running_mean, module.running_var = False, None, None
            module.num_batches_tracked = None
    lr = float(learner.options["inner_lr"])

    def task_loss(params, sx, sy, qx, qy):
        grads = torch.func.grad(lambda p: F.cross_entropy(learner.call(p, sx), sy))(params)
        adapted = {n: params[n] - lr * grads[n] for n in params}
        return F.cross_entropy(learner.call(adapted, qx), qy)

    meta = torch.compile(torch.func.grad(task_loss), dynamic=False)
    params = {n: p.detach() for n, p in learner.network_params().items()}

    def run():
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for sx, sy, qx, qy in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y):
            for n, g in meta(params, sx, sy, qx, qy).items():
                total[n] += g / batch.batch_size
        return total

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 15])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for queries in args.queries:
        learner, batch = setup(queries, "cpu")
        learner.options["task_threads"] = 1  # one thread of tasks: the kernels' own cost
        def run(learner=learner, batch=batch):
            learner.zero_grad(set_to_none=True)
            loss, _ = learner.loss(batch)
            loss.backward()

        base = meta_batch_ms(run)
        shares = kernel_shares(run)
        print(f"{queries} queries a class: {base:.0f} ms; kernel shares of self time: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
              + f" (together {100 * sum(shares.values()):.0f}%)", flush=True)
        if args.channels_last:
            plain_call = learner.call

            def channels_last_call(params, x, plain_call=plain_call):
                params = {n: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p
                          for n, p in params.items()}
                return plain_call(params, x.contiguous(memory_format=torch.channels_last))

            learner.call = channels_last_call
            print(f"  channels-last: {meta_batch_ms(run):.0f} ms", flush=True)
            learner.call = plain_call
        if args.compile:
            compiled = compiled_meta_gradient(learner, batch)
            start = time.perf_counter()
            compiled()
            print(f"  torch.compile: first call {time.perf_counter() - start:.0f} s, then "
                  f"{meta_batch_ms(compiled):.0f} ms", flush=True)


if __name__ == "__main__":
    main()
