"""How much memory a meta-step of second-order MAML needs on a backbone, and a warning before one that will not fit.

Second-order MAML keeps, for every task of a meta-batch, the graph of every inner step (forward and backward, since
the outer gradient differentiates through the inner gradients) and of the query pass. Memory therefore grows with
the activations of one image A (elements of every layer's output; `activation_elements`), the support images times
the inner steps, the query images, and the tasks whose graphs are alive at once (one with the default `backward:
auto` of the loop over tasks, which backpropagates each task at once; all of them with `backward: whole_batch` or
the vmap strategy; one per task thread). With P the network's parameters, in bytes of float32:

    bytes ~= 4 * A * (1.75 * inner_steps * support + 1.2 * query) * tasks_alive + 4 * P * (inner_steps + 1) + 32 MiB

What was measured: the coefficients are a least-squares fit (relative error) to 18 second-order MAML meta-steps
on ResNet-12 on this project's CPU, each in a fresh process, the growth of its resident set
(`benchmarks/maml_memory.py`, `--sweep cpu` and `--sweep cpu-large`): images 16x16 to 84x84, widths 1/8 to full,
1 to 5 inner steps, 1 to 15 queries a class, 1 to 2 tasks. The formula is within -12% to +27% of every one (the
resident set itself varied by up to 15% between two runs at the smallest sizes) and above all four full-width
ones (+1% to +18%): full ResNet-12 at 84x84, 5-way 1-shot 15-query, 5 inner steps, one task, 5.0 GiB measured,
5.7 GiB estimated. One small point each for per-task backward (2 tasks: -8%) and first_order (2 tasks: +12%).

What is extrapolated (ResNet-12 64-160-320-640, 84x84, 5-way, 15 queries a class, second order; GiB):

| inner steps | shots | 1 task | meta-batch 2, whole batch | meta-batch 4, whole batch | meta-batch 4, per task |
|---|---|---|---|---|---|
| 1 | 1 | 4.1 (3.5 measured) | 8.1 | 16.0 | 4.1 |
| 5 | 1 | 5.7 (5.0 measured) | 11.1 | 21.8 | 5.7 |
| 5 | 5 | 12.7 | 25.1 | 50.0 | 12.7 |

So MAML's miniImageNet setting (5 steps, meta-batch 4) on ResNet-12 needs about 22 GiB with one graph for the
meta-batch: more than this 23 GiB machine has free, or a 16 GiB GPU, within an 80 GiB H100 (not measured on a GPU:
CUDA's caching allocator and convolution workspaces add to it); with the default per-task backward, about 5.7
GiB. Other backbones use the same formula, fitted on ResNet-12 alone: treat it as a rough guide for them.
`check_maml_memory` warns, once per setting, when the estimate exceeds the device's free memory (CUDA:
torch.cuda.mem_get_info; CPU: MemAvailable, or os.sysconf's free pages).
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import torch
from torch import nn

C_SUPPORT = 1.75
"""Activation bytes kept per support image and inner step, in units of 4 * A (fitted; see the module docstring)."""
C_QUERY = 1.2
"""The same per query image (fitted)."""
C_PARAMS = 1.0
"""Parameter-sized tensors kept per inner step and for the query pass (fitted)."""
OVERHEAD = 32 * 2**20
"""Bytes a meta-step needs whatever its size (fitted)."""


class MAMLMemoryWarning(UserWarning):
    """A MAML meta-step is estimated to need more memory than the device has free."""


def activation_elements(backbone: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Elements of every leaf module's output for one image of `image_shape` (C, H, W): the activations one forward
    pass produces. Found with one eval-mode forward pass without gradients (running statistics are untouched)."""
    total = 0

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output[0].numel()

    leaves = [m for m in backbone.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    modes = {m: m.training for m in backbone.modules()}
    parameter = next(backbone.parameters(), None)
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, *image_shape, device=parameter.device if parameter is not None else None))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return total


def maml_memory_bytes(activations: int, parameters: int, support: int, query: int, inner_steps: int,
                      tasks_alive: int = 1, first_order: bool = False, adapts_backbone: bool = True) -> int:
    """Estimated bytes of one MAML meta-step (float32) by the formula of the module docstring.

    first_order: the inner graphs are freed step by step, so the support term counts one step; adapts_backbone
    false (ANIL): the backbone runs once on the support set, outside the inner loop."""
    steps = inner_steps if adapts_backbone and not first_order else min(inner_steps, 1)
    kept = C_SUPPORT * steps * support if adapts_backbone else C_QUERY * support
    return int(4 * activations * (kept + C_QUERY * query) * tasks_alive
               + 4 * parameters * C_PARAMS * (steps + 1) + OVERHEAD)


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's free memory, or on CPU MemAvailable from /proc/meminfo (free physical pages
    from os.sysconf where that file is missing); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[tuple[Any, ...]]] = weakref.WeakKeyDictionary()


def check_maml_memory(learner: Any, batch: Any) -> None:
    """Warn (MAMLMemoryWarning, once per learner and setting) when a meta-step of `learner` (MAML, ANIL or
    Meta-SGD) on `batch` is estimated to need more memory than its device has free."""
    options = learner.options
    device = batch.support_x.device
    tasks = batch.batch_size
    alive = learner.tasks_alive(device, tasks)
    image_shape = tuple(batch.support_x.shape[2:])  # a meta-batch: [tasks, images, *one input's shape]
    support, query = batch.support_x.shape[1], batch.query_x.shape[1]
    key = (image_shape, support, query, tasks, alive, options["inner_steps"], options["first_order"], device)
    seen = _CHECKED.setdefault(learner, set())
    if key in seen:
        return
    seen.add(key)
    free = available_memory(device)
    if free is None:
        return
    adapts_backbone = any(name.startswith("backbone.") for name in learner.adapted_params())
    need = maml_memory_bytes(activation_elements(learner.backbone, image_shape),
                             sum(p.numel() for p in learner.parameters()), support, query, options["inner_steps"],
                             alive, options["first_order"], adapts_backbone)
    if need > free:
        order = "first" if options["first_order"] else "second"
        advice = "backward: per_task (one task in memory at a time), " if alive > 1 else ""
        tasks_too = ", tasks" if alive > 1 else ""
        warnings.warn(f"{learner.name}: a {order}-order meta-step of {tasks} task(s) ({support} support and {query} "
                      f"query images of {'x'.join(map(str, image_shape))}, {options['inner_steps']} inner steps) is "
                      f"estimated to need {need / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free "
                      f"(kshot.backbones.memory); set {advice}first_order: true, or use fewer inner steps{tasks_too} "
                      f"or smaller images", MAMLMemoryWarning, stacklevel=3)
