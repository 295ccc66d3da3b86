"""The trainer: meta-trains any learner on its training stream, validates on a fixed episode set, keeps best
and last checkpoints, logs metrics as JSON lines, and resumes exactly where a stopped run left off."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kshot import distributed
from kshot.data.dataset import ClassDataset
from kshot.data.sampler import EpisodeSet
from kshot.episode import Episode
from kshot.config import TrainConfig
from kshot.evaluation import EvaluationResult, evaluate
from kshot.learners import EpisodeShape, Learner
from kshot.training.optim import build_optimizer, build_scheduler
from kshot.training.checkpoint import load_learner_weights, load_trainer_state, read_info, save_checkpoint

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


class RunExistsError(FileExistsError):
    """Training into a folder that already holds a run, without asking to resume or overwrite it."""


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
    """Train `learner` into `run_dir` (which holds checkpoints/, metrics.jsonl)."""

    def __init__(self, learner: Learner, config: TrainConfig, run_dir: str | Path,
                 device: str | torch.device = "cpu", progress: bool = True, run_info: dict[str, Any] | None = None
                 ) -> None:
        self.learner, self.config, self.run_dir = learner, config, Path(run_dir)
        self.device = distributed.local_device(device)
        self.progress = progress
        self.run_info = dict(run_info or {})
        self.best_metric = -math.inf
        self.step = 0
        self.train_seconds = 0.0

    @property
    def last_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS / "best"

    def fit(self, train: ClassDataset, val: ClassDataset | None = None, resume: bool = False,
            overwrite: bool = False) -> list[dict[str, Any]]:
        """Train to `config.steps` outer steps (or the time budget); returns the validation history.

        Under torchrun, every process runs this: each step's batch is split between the processes and their
        gradients averaged (`kshot.distributed`), validation episodes split too; the main process logs and saves."""
        group = distributed.join_process_group(self.device)
        try:
            return self._fit(train, val, resume, overwrite, group)
        finally:
            distributed.leave_process_group(group)

    def _fit(self, train: ClassDataset, val: ClassDataset | None, resume: bool, overwrite: bool,
             group: distributed.ProcessGroup | None) -> list[dict[str, Any]]:
        config = self.config
        main = group is None or group.is_main
        refused: Exception | None = None
        if main:
            try:
                self._claim_run_dir(resume, overwrite)
            except (RunExistsError, FileNotFoundError) as error:
                refused = error
        # Every process learns whether the run folder was claimed before anyone reads it.
        if group is not None and distributed.any_process(refused is not None, self.device) and refused is None:
            raise RunExistsError("the main process (rank 0) could not claim the run folder; its error says why")
        if refused is not None:
            raise refused
        self.learner.prepare(train)
        self.learner.to(self.device)
        stream = self.learner.training_stream(train, EpisodeShape(config.ways, config.shots, config.queries,
                                                                  config.meta_batch), seed=config.seed)
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
        history: list[dict[str, Any]] = []
        log = open(self.run_dir / METRICS_FILE, "a") if main else None
        bar = tqdm(total=config.steps, initial=self.step, desc=f"training {self.learner.name}",
                   disable=not (self.progress and main), dynamic_ncols=True)
        started = time.perf_counter() - self.train_seconds
        try:
            while self.step < config.steps:
                out_of_time = config.time_budget_s is not None and \
                    time.perf_counter() - started >= config.time_budget_s
                if group is not None:
                    out_of_time = distributed.any_process(out_of_time and main, self.device)
                if out_of_time:
                    break
                batch = next(stream)
                if group is not None:
                    batch = distributed.shard(batch, group.rank, group.world_size)
                batch = move(batch, self.device)
                self.learner.train()
                loss, metrics = self.learner.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loss_value = loss.item()
                if group is not None:
                    names = sorted(metrics)
                    values = distributed.average_gradients(trained, [loss_value] + [metrics[k] for k in names])
                    loss_value, metrics = values[0], dict(zip(names, values[1:]))
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.learner.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                if group is not None:
                    distributed.average_buffers(self.learner)
                self.step += 1
                self.train_seconds = time.perf_counter() - started
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"training loss became {loss_value} at step {self.step}; lower the "
                                             f"learning rate or clip gradients (grad_clip)")
                if log is not None and self.step % config.log_every == 0:
                    row = {"step": self.step, "loss": loss_value, **metrics, "lr": scheduler.get_last_lr()[0],
                           "seconds": round(self.train_seconds, 3)}
                    log.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{loss_value:.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
                bar.update(1)
                at_end = self.step >= config.steps
                if (config.val_every > 0 and self.step % config.val_every == 0) or at_end:
                    history.append(self._validate_and_save(val_set, optimizer, scheduler, stream, log, main))
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
    def _claim_run_dir(self, resume: bool, overwrite: bool) -> None:
        has_run = (self.run_dir / CHECKPOINTS).exists() or (self.run_dir / METRICS_FILE).exists()
        if has_run and not resume and not overwrite:
            raise RunExistsError(f"{self.run_dir} already holds a training run; resume it (--resume), choose "
                                 f"another output folder, or pass --overwrite to start it again")
        if resume and not (self.last_dir / "checkpoint.json").exists() and \
                not self.last_dir.with_name(".last.old").exists():
            raise FileNotFoundError(f"nothing to resume: {self.last_dir} holds no checkpoint")
        if overwrite and not resume:
            shutil.rmtree(self.run_dir / CHECKPOINTS, ignore_errors=True)
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _validate_and_save(self, val_set, optimizer, scheduler, stream, log, main: bool = True) -> dict[str, Any]:
        """Validate (each process scoring its share of the episodes in a distributed run) and, in the main
        process, log the result and save the last (and, if it improved, the best) checkpoint."""
        row: dict[str, Any] = {"step": self.step, "seconds": round(self.train_seconds, 3)}
        result: EvaluationResult | None = None
        if val_set is not None:
            result = evaluate(self.learner, val_set, bn_mode=self.config.val_bn_mode, device=self.device,
                              progress=False, across_processes=True)
            row.update(val_accuracy=result.accuracy, val_ci95=result.ci95)
        if not main:
            return row
        if result is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()
        info = {"step": self.step, "train_seconds": self.train_seconds, "train_config": asdict(self.config),
                **self.run_info, "validation": row}
        metric = result.accuracy if result is not None else float(self.step)
        improved = metric > self.best_metric
        if improved:
            self.best_metric = metric
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "stream": stream.state_dict(), "torch_rng": torch.get_rng_state(), "best_metric": self.best_metric,
                 "step": self.step, "train_seconds": self.train_seconds}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.last_dir, self.learner, info, state)
        if improved:
            save_checkpoint(self.best_dir, self.learner, {**info, "best_metric": metric})
        return row

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
        self.best_metric = state["best_metric"]
        self.step = state["step"]
        self.train_seconds = state["train_seconds"]
        # Forget log rows written after the checkpoint, so the log continues where the weights do.
        path = self.run_dir / METRICS_FILE
        if rewrite_log and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(row + "\n" for row in rows))
