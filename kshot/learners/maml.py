"""MAML (Finn, Abbeel and Levine, 2017), first-order MAML, ANIL (Raghu et al., 2020) and Meta-SGD (Li et al.,
2017): learn an initialisation from which a few SGD steps on a support set fit the task.

Model-agnostic through `torch.func.functional_call`: the inner loop updates a dict of tensors, never the
module. Batch norm: during training the inner loop and the query pass use batch statistics (the learner is
in train mode, as in the MAML reference code); at test the evaluator's bn_mode decides (the MAML recipes use
"transductive", the paper's).

Memory: by default (`backward: auto`) the loop over tasks backpropagates each task as soon as its query loss is
known, so only one task's graph is alive at a time, as in learn2learn's loop; the meta-gradient is the same as
backpropagating the mean loss of the meta-batch (up to float rounding), at the same speed (measured on CPU:
benchmarks/maml_growth.py). `backward: whole_batch` keeps every task's graph until the trainer's backward (what
kshot did before; its memory grows with the meta-batch: 32 tasks of Omniglot 5-way 1-shot grew the resident set
by about 0.4 GB with 1 query a class, 2 GB with 15); the "vmap" strategy always does, since it computes the tasks
in one graph. Other memory bounds: `first_order`, fewer `inner_steps`. The first meta-step of each setting warns
if it is estimated to need more memory than the device has free (`kshot.backbones.memory`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from kshot.backbones.memory import check_maml_memory
from kshot.config import STRICT, ConfigError, NonNegativeFloat, PositiveFloat
from kshot.episode import Episode
from kshot.learners.base import Predictor
from kshot.learners.functional import Params, func_inner_loop, inner_loop, pick_strategy
from kshot.learners.gradient import FunctionalLearner, per_task_gradients, surrogate_loss
from kshot.learners.options import Count, PositiveCount
from kshot.learners.task_threads import pool_for
from kshot.learners.vmap_batchnorm import VmapBatchNorm


class MAML(FunctionalLearner):
    """Model-Agnostic Meta-Learning; `first_order: true` gives first-order MAML."""

    name = "maml"

    @dataclass(config=STRICT)
    class Options(FunctionalLearner.Options):
        """FunctionalLearner's, and inner_steps, inner_lr: SGD steps and learning rate of the inner loop;
        test_inner_steps, test_inner_lr: the same at test, None for the training values; first_order: drop the
        second-order terms; backward: when the tasks of a meta-batch are backpropagated, "per_task" (each as
        soon as its loss is known: one task's graph in memory), "whole_batch" (one graph for the meta-batch,
        backpropagated by the trainer) or "auto" (per_task, except whole_batch under the vmap strategy);
        strategy: how the tasks of a meta-batch run (auto, loop or vmap; see `kshot.learners.functional`);
        task_threads: CPU threads over tasks, a positive integer or "auto" (one per intra-op thread)."""

        inner_steps: Count = 1
        inner_lr: PositiveFloat = 0.4
        test_inner_steps: Count | None = None
        test_inner_lr: PositiveFloat | None = None
        first_order: bool = False
        backward: Literal["auto", "per_task", "whole_batch"] = "auto"
        strategy: Literal["auto", "loop", "vmap"] = "auto"
        task_threads: PositiveCount | Literal["auto"] = 1

        @field_validator("task_threads", mode="before")
        @classmethod
        def auto_or_positive(cls, value: Any) -> Any:
            """One clear message for a bad value (pydantic would report each member of the union)."""
            if value != "auto" and (type(value) is not int or value < 1):
                raise PydanticCustomError("auto_or_positive", "input should be 'auto' or a positive integer")
            return value

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **legacy_backward(options))
        pick_strategy(self, self.options["strategy"], torch.device("cpu"))  # refuses vmap where it cannot run
        if self.options["backward"] == "per_task" and self.options["strategy"] == "vmap":
            raise ConfigError("options.backward: per_task needs strategy loop or auto (vmap computes the tasks of "
                              "a meta-batch in one graph); set backward: auto or strategy: loop")

    def task_strategy(self, device: torch.device) -> str:
        """The strategy over tasks: the `strategy` option, where "auto" means loop when backward is per_task."""
        requested = self.options["strategy"]
        if requested == "auto" and self.options["backward"] == "per_task":
            return "loop"
        return pick_strategy(self, requested, device)

    def tasks_alive(self, device: torch.device, tasks: int) -> int:
        """How many tasks' graphs a meta-step of `tasks` tasks holds at once: all of them under vmap or with
        backward whole_batch, one per task thread (each backpropagates its tasks one at a time), else one."""
        if self.task_strategy(device) == "vmap":
            return tasks
        threads = self.task_thread_count(device, tasks)
        if threads > 1:
            return threads
        return tasks if self.options["backward"] == "whole_batch" else 1

    def task_thread_count(self, device: torch.device, tasks: int) -> int:
        """Threads for the tasks of a meta-batch: 1 by default; "auto" gives one per intra-op thread on CPU, n
        gives n (always 1 on GPUs, where one task's kernels already fill the device). Opt-in: on this project's
        2-core CPU it measured 1.08x-1.25x the clone/adapt baseline (BENCHMARKS.md); see task_threads.py."""
        requested = self.options["task_threads"]
        if device.type != "cpu":
            return 1
        threads = torch.get_num_threads() if requested == "auto" else int(requested)
        return max(1, min(threads, tasks))

    # ------------------------------------------------------------------------------- what the loop adapts
    def adapted_params(self) -> Params:
        """The parameters the inner loop updates (all of the network for MAML)."""
        return self.network_params()

    def body(self, x: Tensor) -> Tensor:
        """The part of the network that the inner loop does not adapt (none for MAML)."""
        return x

    def adapted_call(self, params: Params, features: Tensor) -> Tensor:
        """The adapted part of the network on the output of `body`."""
        return self.call(params, features)

    def inner_lrs(self, test: bool = False) -> float | dict[str, Tensor]:
        """The inner learning rate: one float (MAML, ANIL) or a tensor per parameter (Meta-SGD)."""
        lr = self.options["test_inner_lr"] if test else None
        return float(lr if lr is not None else self.options["inner_lr"])

    # --------------------------------------------------------------------------------------------- training
    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
                  ) -> tuple[Tensor, Tensor]:
        """Query loss and outputs of one task after the inner loop (the "loop" strategy)."""
        adapted = inner_loop(self.adapted_call, self.adapted_params(), self.body(support_x), support_y,
                             self.criterion, self.options["inner_steps"], self.inner_lrs(),
                             create_graph=not self.options["first_order"])
        outputs = self.adapted_call(adapted, self.body(query_x))
        return self.criterion(outputs, query_y), outputs

    def vmap_losses(self, batch: Episode) -> tuple[Tensor, Tensor]:
        """Query losses [B] and outputs of a meta-batch with `torch.func.vmap` over tasks. Batch-norm layers in
        training mode normalise with each task's batch statistics; their running statistics are then updated as
        the loop would have updated them (`kshot.learners.vmap_batchnorm`)."""
        lrs = self.inner_lrs()
        stats = VmapBatchNorm(self)

        def one_task(params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            adapted = func_inner_loop(self.adapted_call, params, self.body(sx), sy, self.criterion,
                                      self.options["inner_steps"], lrs, self.options["first_order"],
                                      stats if stats else None)
            outputs = self.adapted_call(adapted, self.body(qx))
            return self.criterion(outputs, qy), outputs

        run = torch.func.vmap(stats.scoped(one_task), in_dims=(None, 0, 0, 0, 0), randomness="different")
        inputs = (self.adapted_params(), batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if not stats:
            (losses, outputs), _ = run(*inputs)
            return losses, outputs
        with stats.active():
            (losses, outputs), recorded = run(*inputs)
        stats.apply(recorded)
        return losses, outputs

    def loss(self, batch: Episode) -> tuple[Tensor, dict[str, float]]:
        """Mean query loss after the inner loop over the tasks of a meta-batch (or one episode). With backward
        per_task (the loop's default) the meta-gradient is already computed here, task by task, and the loss
        returned is a surrogate whose gradient is it (`surrogate_loss`)."""
        batch = self.check_episode(batch)
        check_maml_memory(self, batch)  # a one-line warning if the meta-step is estimated not to fit
        if self.task_strategy(batch.support_x.device) == "vmap":
            losses, outputs = self.vmap_losses(batch)
            return losses.mean(), self.metrics(outputs.detach(), batch.query_y)
        tasks = batch.batch_size
        outer = [p for p in self.parameters() if p.requires_grad]
        threads = self.task_thread_count(batch.support_x.device, tasks)

        def one_task(module: nn.Module, i: int) -> tuple[Tensor, Tensor]:
            return module.task_loss(batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i])

        if threads > 1:
            grads, losses, outputs = pool_for(self, threads).gradients(self, tasks, one_task)
        elif self.options["backward"] != "whole_batch":
            grads, losses, outputs = per_task_gradients(self, range(tasks), tasks, one_task)
        else:  # one graph for the whole meta-batch, backpropagated by the trainer
            losses, outputs = zip(*(one_task(self, i) for i in range(tasks)), strict=True)
            outputs = [out.detach() for out in outputs]
            return torch.stack(losses).mean(), self.metrics(torch.stack(outputs), batch.query_y)
        loss = surrogate_loss(torch.stack(losses).mean(), outer, grads)
        return loss, self.metrics(torch.stack(outputs), batch.query_y)

    # -------------------------------------------------------------------------------------------- inference
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """Fine-tune a copy of the adapted parameters on the support set (works inside torch.no_grad)."""
        self.check_support(support_y)
        steps = self.options["test_inner_steps"]
        steps = self.options["inner_steps"] if steps is None else steps
        lrs = self.inner_lrs(test=True)
        lrs = lrs if isinstance(lrs, float) else {n: lr.detach() for n, lr in lrs.items()}
        with torch.no_grad():
            features = self.body(support_x)
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_() for n, p in self.adapted_params().items()}
            adapted = inner_loop(self.adapted_call, params, features, support_y, self.criterion, steps, lrs,
                                 create_graph=False)
        adapted = {n: p.detach() for n, p in adapted.items()}

        def predict(query_x: Tensor) -> Tensor:
            return self.adapted_call(adapted, self.body(query_x))

        return predict


class ANIL(MAML):
    """Almost No Inner Loop: the inner loop adapts only the linear head; the backbone is learned by the outer
    loop only, so support and query features are computed once per task."""

    name = "anil"

    @dataclass(config=STRICT)
    class Options(MAML.Options):
        """MAML's, but task must be classification: ANIL adapts the classification head."""

        task: Literal["classification"] = "classification"

    def adapted_params(self) -> Params:
        return dict(self.head.named_parameters())

    def body(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def adapted_call(self, params: Params, features: Tensor) -> Tensor:
        return torch.func.functional_call(self.head, params, (features,))


def lr_key(name: str) -> str:
    """A parameter name as a ParameterDict key (dots are not allowed there)."""
    return name.replace(".", "__")


class MetaSGD(MAML):
    """Meta-SGD: MAML whose inner learning rates are learned, one per parameter entry, by the outer optimiser.

    The rates start at `inner_lr`, or are drawn from U[low, high] with `inner_lr_range: [low, high]` (the
    paper's [0.005, 0.1]); at test the learned rates are used (test_inner_lr is ignored).
    """

    name = "metasgd"

    @dataclass(config=STRICT)
    class Options(MAML.Options):
        """MAML's, and inner_lr_range: [low, high] to draw the starting rates from, None to start them all at
        inner_lr; test_inner_lr must stay None (the learned rates are used at test)."""

        inner_lr_range: tuple[NonNegativeFloat, NonNegativeFloat] | None = None

        @field_validator("inner_lr_range")
        @classmethod
        def low_then_high(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
            if value is not None and value[0] > value[1]:
                raise PydanticCustomError("low_then_high", "input should be [low, high] with low <= high")
            return value

        @field_validator("test_inner_lr")
        @classmethod
        def learned(cls, value: float | None) -> float | None:
            if value is not None:
                raise PydanticCustomError("learned", "leave it unset: Meta-SGD learns its inner learning rates")
            return value

    def __init__(self, backbone: nn.Module, image_shape: tuple[int, ...], **options: Any) -> None:
        super().__init__(backbone, image_shape, **options)
        self.learned_lrs = nn.ParameterDict({lr_key(n): nn.Parameter(self.initial_lrs(p))
                                             for n, p in self.adapted_params().items()})

    def initial_lrs(self, like: Tensor) -> Tensor:
        """Starting rates shaped like `like`: inner_lr everywhere, or uniform draws from inner_lr_range."""
        bounds = self.options["inner_lr_range"]
        if bounds is None:
            return torch.full_like(like, self.options["inner_lr"])
        return torch.empty_like(like).uniform_(*bounds)

    def inner_lrs(self, test: bool = False) -> dict[str, Tensor]:
        return {n: self.learned_lrs[lr_key(n)] for n in self.adapted_params()}


def legacy_backward(options: dict[str, Any]) -> dict[str, Any]:
    """Options saved before `backward` replaced `per_task_backward`, rewritten to run exactly as then: true ->
    backward per_task (which always ran the loop over tasks, so a strategy of vmap becomes loop), false (the old
    default) -> whole_batch. A checkpoint that has it thus trains on as it did; set backward: auto to move it
    to the memory-bounded default (the same meta-gradient)."""
    if "per_task_backward" not in options:
        return options
    options = dict(options)
    legacy = options.pop("per_task_backward")
    if type(legacy) is not bool:
        raise ConfigError(f"options.per_task_backward: input should be a valid boolean (got {legacy!r}); it is now "
                          f"backward: auto, per_task or whole_batch")
    if "backward" in options:
        raise ConfigError("options.per_task_backward: give backward only (per_task_backward is its old name)")
    options["backward"] = "per_task" if legacy else "whole_batch"
    if legacy and options.get("strategy") == "vmap":
        options["strategy"] = "loop"
    return options
