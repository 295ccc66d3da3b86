"""The trainer: meta-trains any learner on its training stream, validates on a fixed episode set, keeps best
and last checkpoints, logs metrics as JSON lines, and resumes exactly where a stopped run left off.

Runs cannot be lost: the trainer locks its folder, sets an old run aside (rather than deleting it) until the
new one has checkpointed, saves `last` on a step/time cadence besides validation, refuses to resume with
settings that change what is trained, stops with `TrainingDivergedError` as soon as anything goes
non-finite, and on Ctrl-C or SIGTERM saves `last` at the end of the current step before stopping
(`TrainingInterrupted`)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kshot import distributed
from kshot.config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from kshot.data.augment import AugmentConfig, BatchAugmenter, parse_augment_spec
from kshot.data.dataset import ClassDataset
from kshot.data.sampler import EpisodeSet
from kshot.episode import Episode
from kshot.evaluation import EvaluationResult, evaluate
from kshot.learners import EpisodeShape, Learner
from kshot.progress import progress_bar
from kshot.training import run_folder
from kshot.training.checkpoint import load_learner_weights, load_trainer_state, read_info, save_checkpoint
from kshot.training.interrupt import StopRequest, TrainingInterrupted
from kshot.training.optim import build_optimizer, build_scheduler
from kshot.training.run_folder import CHECKPOINTS, RunExistsError, RunLockedError

METRICS_FILE = "metrics.jsonl"
logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "METRICS_FILE", "ResumeSettingsError", "RunExistsError", "RunLockedError", "Trainer",
           "TrainingDivergedError", "TrainingInterrupted", "json_line"]


class ResumeSettingsError(ConfigError):
    """Resuming a run with settings that would change what it trains (outside `RESUMABLE_CHANGES`)."""


class TrainingDivergedError(FloatingPointError, ValueError):
    """The loss, a gradient, a weight or a batch-norm statistic became NaN or infinite during training."""


def json_line(row: dict[str, Any]) -> str:
    """One metrics.jsonl line of strict JSON: NaN and infinities (which JSON cannot hold) are written as null."""
    safe = {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in row.items()}
    return json.dumps(safe, allow_nan=False) + "\n"


def _plain(value: Any) -> Any:
    """`value` as it reads back from checkpoint.json (tuples as lists, unknown types as strings)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, the names `--set` uses (e.g. {"backbone": {"hidden": 8}} -> backbone.hidden)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: dict[str, Any], config: TrainConfig, run_info: dict[str, Any]
                     ) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between a checkpoint's info and the run about to resume it, as {dotted key: (was,
    now)}: the training settings, the training augmentation, and the recipe (when both record one) without its
    train and evaluate parts."""
    before, after = {"train": dict(saved.get("train_config") or {})}, {"train": _plain(asdict(config))}
    before["augment"], after["augment"] = saved.get("train_augmentation"), run_info.get("train_augmentation")
    for key in list(after["train"]):
        if key not in before["train"]:  # a setting newer than the checkpoint: nothing to compare it with
            del after["train"][key]
    if isinstance(saved.get("recipe"), dict) and isinstance(run_info.get("recipe"), dict):
        before.update({k: v for k, v in saved["recipe"].items() if k not in ("train", "evaluate")})
        after.update({k: v for k, v in _plain(run_info["recipe"]).items() if k not in ("train", "evaluate")})
    old, new = _flatten(before), _flatten(after)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def move(batch: Any, device: torch.device) -> Any:
    """A training batch (Episode, tensor, or tuple/list/dict of them) on `device`."""
    if isinstance(batch, (Episode, torch.Tensor)):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move(value, device) for key, value in batch.items()}
    return batch


class Trainer:
    """Train `learner` into `run_dir` (which holds checkpoints/, metrics.jsonl).

    `augment` (an `AugmentConfig` or its dict, e.g. a recipe's augment section) augments every training batch on
    the training device (`kshot.data.augment`), never validation; checkpoint.json records it as
    `train_augmentation`, beside the model's input contract."""

    def __init__(self, learner: Learner, config: TrainConfig, run_dir: str | Path,
                 device: str | torch.device = "cpu", progress: bool = True, run_info: dict[str, Any] | None = None,
                 augment: AugmentConfig | dict[str, Any] | None = None) -> None:
        self.learner, self.config, self.run_dir = learner, config, Path(run_dir)
        self.device = distributed.local_device(device)
        self.progress = progress
        self.run_info = {**(run_info or {}), "train_augmentation": parse_augment_spec(augment)}
        self._augmenter: BatchAugmenter | None = None
        self.best_metric = -math.inf
        self.step = 0
        self.train_seconds = 0.0
        self._lock = run_folder.RunLock(self.run_dir)
        self._replacing = False  # an old run is set aside until this one saves its first checkpoint
        self._resumes: list[dict[str, Any]] = []  # what each resume changed, recorded in checkpoint.json
        self._saved_at = 0.0
        self._watched: list[torch.Tensor] = []

    @property
    def last_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS / "best"

    def fit(self, train: ClassDataset, val: ClassDataset | None = None, resume: bool = False,
            overwrite: bool = False) -> list[dict[str, Any]]:
        """Train to `config.steps` outer steps (or the time budget); returns the validation history.

        The trainer holds `run_dir`'s lock throughout (`RunLockedError` for a second trainer). A folder holding a
        checkpoint needs `resume` (refused with `ResumeSettingsError` if settings outside `RESUMABLE_CHANGES`
        changed) or `overwrite` (the old run is set aside, deleted once the new run has saved a checkpoint, and put
        back if it fails before); anything non-finite stops training with `TrainingDivergedError`.

        Under torchrun, every process runs this: each step's batch is split between the processes and their
        gradients averaged (`kshot.distributed`), validation episodes split too; the main process logs and saves."""
        group = distributed.join_process_group(self.device)
        try:
            return self._fit(train, val, resume, overwrite, group)
        finally:
            self._lock.release()
            distributed.leave_process_group(group)

    def _fit(self, train: ClassDataset, val: ClassDataset | None, resume: bool, overwrite: bool,
             group: distributed.ProcessGroup | None) -> list[dict[str, Any]]:
        main = group is None or group.is_main
        refused: Exception | None = None
        if main:
            try:
                resume = self._claim_run_dir(resume, overwrite)
            except Exception as error:
                refused = error
        # Every process learns whether the run folder was claimed, and whether the run resumes, before anyone
        # reads it.
        if group is not None:
            if distributed.any_process(refused is not None, self.device):
                if refused is None:
                    raise RunExistsError("the main process (rank 0) could not claim the run folder; its error says "
                                         "why")
            else:
                resume = distributed.any_process(main and resume, self.device)
        if refused is not None:
            raise refused
        try:
            history = self._train(train, val, resume, group)
        except BaseException:
            if main and self._replacing:  # failed before its first checkpoint: the old run comes back
                run_folder.put_back(self.run_dir)
                self._replacing = False
            raise
        if main and self._replacing:
            run_folder.discard_set_aside(self.run_dir)
            self._replacing = False
        return history

    def _train(self, train: ClassDataset, val: ClassDataset | None, resume: bool,
               group: distributed.ProcessGroup | None) -> list[dict[str, Any]]:
        """The training loop proper, once the run folder is claimed."""
        config = self.config
        main = group is None or group.is_main
        self.learner.prepare(train)
        self.learner.to(self.device)
        stream = self.learner.training_stream(train, EpisodeShape(config.ways, config.shots, config.queries,
                                                                  config.meta_batch), seed=config.seed)
        augment = self.run_info["train_augmentation"]
        if augment is not None and not AugmentConfig.from_dict(augment).is_identity:
            contract = getattr(train, "contract", None)  # un-normalise its mean/std around the augmentation
            self._augmenter = BatchAugmenter(augment, seed=config.seed, mean=getattr(contract, "mean", None),
                                             std=getattr(contract, "std", None))
        optimizer = build_optimizer(config, self.learner)
        scheduler = build_scheduler(config, optimizer)
        val_set = None
        if val is not None and config.val_every > 0:
            val_set = EpisodeSet(val, config.val_ways, config.val_shots or config.shots, config.val_queries,
                                 config.val_episodes, seed=config.seed + 1)
        torch.manual_seed(config.seed)
        if resume:
            self._restore(optimizer, scheduler, stream, rewrite_log=main)
        if group is not None:
            distributed.broadcast_module(self.learner)
        trained = [p for p in self.learner.parameters() if p.requires_grad]
        self._watch(trained)
        history: list[dict[str, Any]] = []
        log = open(self.run_dir / METRICS_FILE, "a") if main else None
        bar = progress_bar(total=config.steps, initial=self.step, desc=f"training {self.learner.name}",
                           enabled=self.progress and main, dynamic_ncols=True)
        started = time.perf_counter() - self.train_seconds
        self._saved_at = time.perf_counter()
        stop = StopRequest()
        try:
            with stop:
                while self.step < config.steps:
                    out_of_time = main and config.time_budget_s is not None and \
                        time.perf_counter() - started >= config.time_budget_s  # the main process's clock rules
                    stopping = stop.requested
                    if group is not None:
                        out_of_time, stopping = distributed.on_any_process((out_of_time, stopping), self.device)
                    if stopping:
                        if main:
                            self._save_last(optimizer, scheduler, stream, log)
                        raise TrainingInterrupted(
                            f"training stopped by {stop.signal_name or 'another process'} at step {self.step}; "
                            f"checkpoint saved in {self.last_dir}: continue with --resume (kshot train) or "
                            f"resume=True (Trainer.fit)")
                    if out_of_time:
                        break
                    batch = next(stream)
                    if self._augmenter is not None:  # on the device, before the batch is split between
                        # processes, so that any process count sees the same images
                        batch = self._augmenter(move(batch, self.device))
                    if group is not None:
                        batch = distributed.shard(batch, group.rank, group.world_size)
                    batch = move(batch, self.device)
                    self.learner.train()
                    loss, metrics = self.learner.loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if group is not None:
                        names = sorted(metrics)
                        values = distributed.average_gradients(trained,
                                                               [loss.item()] + [metrics[k] for k in names])
                        loss, metrics = values[0], dict(zip(names, values[1:]))
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.learner.parameters(), config.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    if group is not None:
                        distributed.average_buffers(self.learner)
                    self.step += 1
                    self.train_seconds = time.perf_counter() - started
                    loss_value = self._check_finite(loss, trained)
                    if log is not None and self.step % config.log_every == 0:
                        row = {"step": self.step, "loss": loss_value, **metrics, "lr": scheduler.get_last_lr()[0],
                               "seconds": round(self.train_seconds, 3)}
                        log.write(json_line(row))
                        bar.set_postfix(loss=f"{loss_value:.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
                    bar.update(1)
                    at_end = self.step >= config.steps
                    if (config.val_every > 0 and self.step % config.val_every == 0) or at_end:
                        history.append(self._validate_and_save(val_set, optimizer, scheduler, stream, log, main))
                    elif main and self._checkpoint_due():
                        self._save_last(optimizer, scheduler, stream, log)
            validated = bool(history) and history[-1]["step"] == self.step
            if self.step < config.steps and not validated:  # stopped by the time budget: keep what was reached
                history.append(self._validate_and_save(val_set, optimizer, scheduler, stream, log, main))
        finally:
            bar.close()
            if log is not None:
                log.close()
        if group is not None:
            distributed.barrier()  # the main process's checkpoints are on disk for everyone to load
        return history

    # --------------------------------------------------------------------------------------------- internals
    def _claim_run_dir(self, resume: bool, overwrite: bool) -> bool:
        """Lock the run folder for this trainer, tidy what a killed run left, and decide how the run starts;
        returns whether it resumes. Refusals happen here, before anything of the old run is changed.

        A folder without a checkpoint (a run killed before its first one) holds nothing to lose: it starts
        afresh, with or without --resume. A folder with one needs --resume, or --overwrite, whose old run is
        set aside until the new run has saved its first checkpoint (and comes back if it fails before)."""
        if resume and not self.run_dir.is_dir():
            raise FileNotFoundError(f"nothing to resume: {self.run_dir} does not exist")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            run_folder.recover(self.run_dir)
            found = run_folder.holds_checkpoint(self.run_dir)
            if resume and found:
                self._check_resumable()
                return True
            if resume:
                logger.warning("note: %s holds no checkpoint to resume (its run stopped before saving one); "
                               "training starts from step 0", self.run_dir)
            elif found and not overwrite:
                raise RunExistsError(f"{self.run_dir} already holds a training run; resume it (--resume), choose "
                                     f"another output folder, or pass --overwrite to start it again")
            self._replacing = run_folder.set_aside(self.run_dir)
            return False
        except BaseException:
            self._lock.release()
            raise

    def _check_resumable(self) -> None:
        """Refuse to resume with settings that change what is trained (all but `RESUMABLE_CHANGES`, which say
        how long and how often); note the allowed changes, which checkpoint.json then records."""
        saved = read_info(self.last_dir)
        changes = changed_settings(saved, self.config, self.run_info)
        refused = [key for key in changes if key.removeprefix("train.") not in RESUMABLE_CHANGES
                   or not key.startswith("train.")]
        if refused:
            def shown(value: Any) -> str:
                return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)

            what = "; ".join(f"{key} was {shown(changes[key][0])}, now {shown(changes[key][1])}" for key in refused)
            undo = " or ".join(f"--set {key}" for key in refused)
            raise ResumeSettingsError(f"cannot resume {self.run_dir} with changed settings: {what}; resume without "
                                      f"{undo}, or start a new run (another --out, or --overwrite)")
        self._resumes = list(saved.get("resumed") or [])
        if changes:
            self._resumes.append({"at_step": saved.get("step"),
                                  "changed": {key: list(change) for key, change in changes.items()}})

    def _checkpoint_due(self) -> bool:
        """Whether `last` is due on the step or time cadence (`checkpoint_every`, `checkpoint_every_s`), which
        runs besides validation so that a killed run loses little, whatever val_every is."""
        every, every_s = self.config.checkpoint_every, self.config.checkpoint_every_s
        return bool(every and self.step % every == 0) or \
            bool(every_s and time.perf_counter() - self._saved_at >= every_s)

    def _watch(self, trained: list[torch.nn.Parameter]) -> None:
        """The weights and floating-point buffers `_check_finite` checks every step, listed once per run (the
        gradients, new tensors every step, are listed each time)."""
        buffers = [b for b in self.learner.buffers() if b.is_floating_point()]
        self._watched = [t for t in trained + buffers if t.numel()]

    def _check_finite(self, loss: torch.Tensor | float, trained: list[torch.nn.Parameter]) -> float:
        """The step's loss as a float, or `TrainingDivergedError` if the loss, a gradient, a weight or a
        floating-point buffer (batch-norm statistics) is NaN or infinite.

        Cheap enough for every step: one fused norm per tensor (`torch._foreach_norm`; NaN and infinity make it
        non-finite, and so do values past about 1e19, where float32 squares overflow: a model that large has
        diverged too), read back with the loss in one device sync (the one reading the loss always cost); only a
        failure looks at tensors one by one."""
        grads = [p.grad for p in trained if p.grad is not None and p.grad.numel()]
        tensors = grads + self._watched
        norms = torch._foreach_norm(tensors) if tensors else []
        finite = torch.stack([norm.float() for norm in norms]).isfinite().all() if norms else None
        if isinstance(loss, torch.Tensor):
            checks = [loss.detach().float().reshape(())] + ([finite.float()] if finite is not None else [])
            values = torch.stack(checks).tolist()
            loss_value, ok = values[0], values[-1] if finite is not None else 1.0
        else:
            loss_value, ok = float(loss), finite.item() if finite is not None else 1.0
        if ok and math.isfinite(loss_value):
            return loss_value
        config = self.config
        clip = f"lower train.grad_clip (now {config.grad_clip:g})" if config.grad_clip else "set train.grad_clip"
        raise TrainingDivergedError(f"training diverged at step {self.step}: {self._first_non_finite(loss_value)}; "
                                    f"lower train.lr (now {config.lr:g}) or {clip}")

    def _first_non_finite(self, loss_value: float) -> str:
        """What went non-finite first in a step: batch-norm statistics (updated by the forward pass), the loss,
        a gradient, or a weight (updated by the optimiser)."""
        def problem(tensor: torch.Tensor) -> str | None:
            if bool(tensor.isnan().any()):
                return "nan"
            if bool(tensor.isinf().any()):
                return "inf"
            return None if bool(torch.linalg.vector_norm(tensor).isfinite()) else "too large (beyond 1e19)"

        for name, buffer in self.learner.named_buffers():
            if buffer.is_floating_point() and buffer.numel() and (found := problem(buffer)):
                module, _, leaf = name.rpartition(".")
                what = f"batch-norm {leaf} of {module}" if leaf in ("running_mean", "running_var") else f"buffer {name}"
                return f"{what} is {found}"
        if not math.isfinite(loss_value):
            return f"the loss is {loss_value}"
        parameters = [(name, p) for name, p in self.learner.named_parameters() if p.numel()]
        for name, parameter in parameters:
            if parameter.grad is not None and (found := problem(parameter.grad)):
                return f"the gradient of {name} is {found}"
        for name, parameter in parameters:
            if found := problem(parameter):
                return f"weight {name} is {found}"
        return "a value overflowed"

    def _validate_and_save(self, val_set, optimizer, scheduler, stream, log, main: bool = True) -> dict[str, Any]:
        """Validate (each process scoring its share of the episodes in a distributed run) and, in the main
        process, log the result and save the last (and, if it improved, the best) checkpoint. Model selection
        uses only `val_set` (the validation split); without one, the latest step counts as best."""
        row: dict[str, Any] = {"step": self.step, "seconds": round(self.train_seconds, 3)}
        result: EvaluationResult | None = None
        if val_set is not None:
            result = evaluate(self.learner, val_set, bn_mode=self.config.val_bn_mode, device=self.device,
                              progress=False, across_processes=True)
            row.update(val_accuracy=result.accuracy, val_ci95=result.ci95)
        if not main:
            return row
        if result is not None:
            log.write(json_line(row))
        metric = result.accuracy if result is not None else float(self.step)
        improved = metric > self.best_metric
        if improved:
            self.best_metric = metric
        info = self._save_last(optimizer, scheduler, stream, log, validation=row)
        if improved:
            save_checkpoint(self.best_dir, self.learner, {**info, "best_metric": metric})
        return row

    def _save_last(self, optimizer, scheduler, stream, log, validation: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
        """Save the `last` checkpoint (weights, what was trained how, and the state to resume exactly), with the
        log flushed up to it; the first one also deletes the old run an --overwrite set aside. Returns its info."""
        log.flush()
        info = {"step": self.step, "train_seconds": self.train_seconds, "train_config": asdict(self.config),
                **self.run_info, "validation": None if validation is None else json.loads(json_line(validation))}
        if self._resumes:
            info["resumed"] = self._resumes
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "stream": stream.state_dict(), "torch_rng": torch.get_rng_state(), "best_metric": self.best_metric,
                 "step": self.step, "train_seconds": self.train_seconds}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self._augmenter is not None:
            state["augment_rng"] = self._augmenter.get_state()  # a uint8 tensor, as weights_only loading needs
        save_checkpoint(self.last_dir, self.learner, info, state)
        self._saved_at = time.perf_counter()
        if self._replacing:
            run_folder.discard_set_aside(self.run_dir)
            self._replacing = False
        return info

    def _restore(self, optimizer, scheduler, stream, rewrite_log: bool = True) -> None:
        read_info(self.last_dir)
        load_learner_weights(self.learner, self.last_dir, self.device)
        state = load_trainer_state(self.last_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self._augmenter is not None and "augment_rng" in state:
            self._augmenter.set_state(state["augment_rng"])
        self.best_metric = state["best_metric"]
        self.step = state["step"]
        self.train_seconds = state["train_seconds"]
        # Forget log rows written after the checkpoint, so the log continues where the weights do.
        path = self.run_dir / METRICS_FILE
        if rewrite_log and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(row + "\n" for row in rows))
