"""Runs that cannot be lost or hijacked: safe checkpoint loading, overwrite that sets the old run aside, checkpoints
on a cadence, one trainer per folder, stale partial saves cleaned, resume with changed settings refused, training
stopped when it diverges, and logs that are strict JSON (issue 10)."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import torch
from conftest import synthetic_dataset

from kshot.data import EpisodeSet
from kshot.evaluation import evaluate
from kshot.learners import build_learner
from kshot.training import CheckpointError, RunExistsError, TrainConfig, Trainer, run_folder
from kshot.training.trainer import ResumeSettingsError, RunLockedError, TrainingDivergedError

BACKBONE = {"name": "conv4", "hidden": 8}


@pytest.fixture
def data():
    return synthetic_dataset(classes=10, per_class=6, size=16, seed=2)


def make(data):
    torch.manual_seed(0)
    return build_learner("protonet", data.image_shape, BACKBONE)


def config(steps=3, **extra):
    values = dict(ways=3, shots=1, queries=2, steps=steps, val_every=3, val_ways=3, val_queries=2, val_episodes=5,
                  log_every=1, checkpoint_every_s=0)
    return TrainConfig(**{**values, **extra})


def rows(run):
    """metrics.jsonl rows, read as strict JSON (a bare NaN or Infinity fails)."""
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    """Stands for a kill at a given step (raised from inside the training step)."""


def dies_at(learner, step):
    """Make `learner` raise `Killed` when asked for the loss of training step `step` (1-based)."""
    calls = {"n": 0}
    loss = learner.loss

    def dying(batch):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed(f"killed at step {step}")
        return loss(batch)

    learner.loss = dying
    return learner


def last_step(run):
    return json.loads((run / "checkpoints" / "last" / "checkpoint.json").read_text())["step"]


# ------------------------------------------------------------------------------------------ A. safe loading
class Payload:
    """Unpickling this would create the file `path`: what a crafted trainer_state.pt could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_crafted_trainer_state_cannot_run_code_on_resume(zip_format, data, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    Trainer(make(data), config(3), run, progress=False).fit(data, data)
    state = run / "checkpoints" / "last" / "trainer_state.pt"
    torch.save({"optimizer": Payload(marker)}, state, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(Exception) as refused:
        Trainer(make(data), config(6), run, progress=False).fit(data, data, resume=True)
    assert not marker.exists(), "loading the trainer state ran code"
    assert refused.type is CheckpointError
    assert "\n" not in str(refused.value) and "trainer_state.pt" in str(refused.value)


def test_trainer_state_round_trips_without_unpickling(data, tmp_path):
    """Optimiser (Adam and SGD with momentum), schedule, sampler stream and RNG state all load weights-only."""
    for optimizer in ("adam", "sgd"):
        run = tmp_path / optimizer
        Trainer(make(data), config(3, optimizer=optimizer, lr_decay_every=2), run, progress=False).fit(data, data)
        state = torch.load(run / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
        assert state["step"] == 3 and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3
        assert state["stream"]["rng"]["bit_generator"] == "PCG64"


# --------------------------------------------------------------------------------------- B. no lost work
def finished_run(data, run):
    Trainer(make(data), config(3), run, progress=False).fit(data, data)
    (run / "results.json").write_text("[]\n")
    (run / "curves.png").write_bytes(b"png")
    return {path.relative_to(run): path.read_bytes() for path in run.rglob("*") if path.is_file()
            and path.name != ".lock"}


def test_overwrite_that_fails_puts_the_old_run_back(data, tmp_path):
    run = tmp_path / "run"
    before = finished_run(data, run)
    with pytest.raises(ValueError, match="5000-way"):  # an impossible episode shape, found after the claim
        Trainer(make(data), config(3, ways=5000), run, progress=False).fit(data, data, overwrite=True)
    after = {path.relative_to(run): path.read_bytes() for path in run.rglob("*") if path.is_file()
             and path.name != ".lock"}
    assert after == before


def test_overwrite_replaces_every_file_of_the_old_run(data, tmp_path):
    run = tmp_path / "run"
    finished_run(data, run)
    Trainer(make(data), config(2, val_every=2), run, progress=False).fit(data, data, overwrite=True)
    assert sorted(path.name for path in run.iterdir()) == [".lock", "checkpoints", "metrics.jsonl"]
    assert [row["step"] for row in rows(run) if "loss" in row] == [1, 2] and last_step(run) == 2


def test_overwrite_killed_before_its_first_checkpoint_gets_the_old_run_back(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    finished_run(data, run)
    with monkeypatch.context() as patch:  # a hard kill: no clean-up runs
        patch.setattr(run_folder, "put_back", lambda run_dir: None)
        with pytest.raises(Killed):
            Trainer(dies_at(make(data), 2), config(3), run, progress=False).fit(data, data, overwrite=True)
    assert (run / run_folder.SET_ASIDE).is_dir()
    Trainer(make(data), config(6), run, progress=False).fit(data, data, resume=True)  # claims and recovers
    assert not (run / run_folder.SET_ASIDE).exists() and (run / "results.json").read_bytes() == b"[]\n"
    assert [row["step"] for row in rows(run) if "loss" in row] == [1, 2, 3, 4, 5, 6]


def test_last_checkpoint_follows_the_step_cadence_without_validation(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        Trainer(dies_at(make(data), 6), config(10, val_every=100, checkpoint_every=2), run,
                progress=False).fit(data, data)
    assert last_step(run) == 4 and not (run / "checkpoints" / "best").exists()  # best stays validation-driven
    trainer = Trainer(make(data), config(10, val_every=100, checkpoint_every=2), run, progress=False)
    trainer.fit(data, data, resume=True)
    assert trainer.step == 10 and [row["step"] for row in rows(run) if "loss" in row] == list(range(1, 11))


def test_last_checkpoint_follows_the_time_cadence(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        Trainer(dies_at(make(data), 4), config(10, val_every=100, checkpoint_every_s=1e-6), run,
                progress=False).fit(data, data)
    assert last_step(run) == 3


def test_run_killed_before_its_first_checkpoint_can_start_again(data, tmp_path, caplog):
    run = tmp_path / "run"
    with pytest.raises(Killed):
        Trainer(dies_at(make(data), 3), config(6, val_every=100), run, progress=False).fit(data, data)
    assert (run / "metrics.jsonl").is_file() and not (run / "checkpoints").exists()
    Trainer(make(data), config(2), run, progress=False).fit(data, data)  # no --overwrite needed
    assert [row["step"] for row in rows(run) if "loss" in row] == [1, 2]

    other = tmp_path / "other"
    with pytest.raises(Killed):
        Trainer(dies_at(make(data), 3), config(6, val_every=100), other, progress=False).fit(data, data)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(make(data), config(2), other, progress=False)
        trainer.fit(data, data, resume=True)
    assert "holds no checkpoint to resume" in caplog.text and "step 0" in caplog.text
    assert trainer.step == 2 and [row["step"] for row in rows(other) if "loss" in row] == [1, 2]


def test_a_second_trainer_on_the_same_folder_is_refused(data, tmp_path):
    run = tmp_path / "run"
    started, release = threading.Event(), threading.Event()
    first = make(data)
    loss = first.loss

    def waiting(batch):
        started.set()
        release.wait(30)
        return loss(batch)

    first.loss = waiting
    errors = []
    thread = threading.Thread(target=lambda: _fit_or_record(first, run, data, errors))
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(RunLockedError) as refused:
            Trainer(make(data), config(3), run, progress=False).fit(data, data, overwrite=True)
        assert f"pid {os.getpid()}" in str(refused.value) and str(run) in str(refused.value)
        assert isinstance(refused.value, RunExistsError) and "\n" not in str(refused.value)
    finally:
        release.set()
        thread.join(30)
    assert not errors
    assert [row["step"] for row in rows(run) if "loss" in row] == [1, 2, 3]  # the first run's log alone
    Trainer(make(data), config(6), run, progress=False).fit(data, data, resume=True)  # the lock was let go


def _fit_or_record(learner, run, data, errors):
    try:
        Trainer(learner, config(3), run, progress=False).fit(data, data)
    except Exception as error:  # reported by the test
        errors.append(error)


def test_stale_partial_checkpoint_folders_are_cleaned_when_a_run_is_claimed(data, tmp_path):
    run = tmp_path / "run"
    Trainer(make(data), config(3), run, progress=False).fit(data, data)
    stale = [run / "checkpoints" / ".last.x1y2.partial", run / "checkpoints" / ".best.z3.partial"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    Trainer(make(data), config(6), run, progress=False).fit(data, data, resume=True)
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["best", "last"]


def test_resume_with_a_changed_lr_is_refused_before_anything_is_written(data, tmp_path):
    run = tmp_path / "run"
    Trainer(make(data), config(3), run, progress=False).fit(data, data)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"}
    with pytest.raises(ResumeSettingsError) as refused:
        Trainer(make(data), config(6, lr=1e-4), run, progress=False).fit(data, data, resume=True)
    assert str(refused.value) == (f"cannot resume {run} with changed settings: train.lr was 0.001, now 0.0001; "
                                  f"resume without --set train.lr, or start a new run (another --out, or --overwrite)")
    assert isinstance(refused.value, ValueError)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"} == before


def test_resume_with_a_changed_recipe_is_refused_but_how_long_may_change(data, tmp_path):
    run = tmp_path / "run"
    recipe = {"name": "toy", "learner": "protonet", "backbone": BACKBONE, "train": {"steps": 3},
              "evaluate": [{"ways": 3, "shots": 1}]}
    Trainer(make(data), config(3), run, progress=False, run_info={"recipe": recipe}).fit(data, data)
    wider = {**recipe, "backbone": {"name": "conv4", "hidden": 16}}
    with pytest.raises(ResumeSettingsError, match="backbone.hidden was 8, now 16"):
        Trainer(make(data), config(6), run, progress=False, run_info={"recipe": wider}).fit(data, data, resume=True)
    longer = {**recipe, "train": {"steps": 6}, "evaluate": []}  # steps and evaluation settings may change
    Trainer(make(data), config(6, val_episodes=4), run, progress=False,
            run_info={"recipe": longer}).fit(data, data, resume=True)
    info = json.loads((run / "checkpoints" / "last" / "checkpoint.json").read_text())
    assert info["step"] == 6 and info["train_config"]["steps"] == 6 and info["train_config"]["val_episodes"] == 4
    assert info["resumed"] == [{"at_step": 3, "changed": {"train.steps": [3, 6], "train.val_episodes": [5, 4]}}]


# ----------------------------------------------------------------------------------- C. numerical guards
def test_diverging_training_stops_with_a_one_line_error(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as diverged:
        Trainer(make(data), config(30, lr=1e9, optimizer="adam"), run, progress=False).fit(data, data)
    message = str(diverged.value)
    assert message.startswith("training diverged at step ") and "\n" not in message
    assert "lower train.lr (now 1e+09) or set train.grad_clip" in message
    assert isinstance(diverged.value, ValueError) and isinstance(diverged.value, FloatingPointError)
    step = int(message.split("step ")[1].split(":")[0])
    assert [row["step"] for row in rows(run) if "loss" in row] == list(range(1, step))  # nothing logged after it


def test_a_nan_gradient_names_the_parameter(data, tmp_path):
    learner = make(data)
    first = next(learner.parameters())
    first.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"at step 1: the gradient of backbone\.\S+ is nan; .*"
                                                    r"lower train.grad_clip \(now 1\)"):
        Trainer(learner, config(3, grad_clip=1.0), tmp_path, progress=False).fit(data, data)


# ---------------------------------------------------------------------------------------------- D. logs
def test_metrics_log_is_strict_json_and_one_episode_has_no_interval(data, tmp_path):
    learner = make(data)
    loss = learner.loss

    def nan_metric(batch):
        value, metrics = loss(batch)
        return value, {**metrics, "odd": float("nan")}

    learner.loss = nan_metric
    Trainer(learner, config(3, val_episodes=1), tmp_path, progress=False).fit(data, data)
    logged = rows(tmp_path)
    assert all(row["odd"] is None for row in logged if "loss" in row)
    assert [row["val_ci95"] for row in logged if "val_accuracy" in row] == [None]
    result = evaluate(learner, EpisodeSet(data, 3, 1, 2, 1, seed=0), progress=False)
    assert "nan" not in result.summary() and "(no confidence interval from 1 episode" in result.summary()
    assert result.as_row()["ci95"] is None
    json.dumps(result.as_row(), allow_nan=False)
    info = json.loads((tmp_path / "checkpoints" / "last" / "checkpoint.json").read_text())
    assert info["validation"]["val_ci95"] is None



# ------------------------------------------------------------------------------- stopping on Ctrl-C / SIGTERM
def signalled_at(learner, step, number):
    """Make the process receive signal `number` while computing the loss of training step `step` (1-based)."""
    import signal as signals

    calls = {"n": 0}
    loss = learner.loss

    def signalled(batch):
        calls["n"] += 1
        if calls["n"] == step:
            signals.raise_signal(number)
        return loss(batch)

    learner.loss = signalled
    return learner


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_in_progress_and_the_run_resumes(name, data, tmp_path):
    import signal as signals

    from kshot.training.trainer import TrainingInterrupted

    number = getattr(signals, name)
    before = signals.getsignal(number)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=rf"stopped by {name} at step 2; checkpoint saved .*--resume"):
        Trainer(signalled_at(make(data), 2, number), config(steps=6, val_every=0), run, progress=False).fit(data)
    assert signals.getsignal(number) is before  # the handler is put back
    assert last_step(run) == 2  # the step being computed when the signal came was finished and saved
    Trainer(make(data), config(steps=6, val_every=0), run, progress=False).fit(data, resume=True)
    assert last_step(run) == 6
    assert [row["step"] for row in rows(run) if "loss" in row] == [1, 2, 3, 4, 5, 6]


def test_a_second_ctrl_c_stops_at_once(data, tmp_path):
    import signal as signals

    learner = make(data)
    calls = {"n": 0}
    loss = learner.loss

    def twice(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            signals.raise_signal(signals.SIGINT)
            signals.raise_signal(signals.SIGINT)
        return loss(batch)

    learner.loss = twice
    with pytest.raises(KeyboardInterrupt) as caught:
        Trainer(learner, config(steps=6, val_every=0), tmp_path / "run", progress=False).fit(data)
    assert type(caught.value) is KeyboardInterrupt  # not the checkpointed stop
