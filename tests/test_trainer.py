"""Trainer and checkpoints: exact resume, no silent overwrite, no half-written checkpoint, best and last."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import synthetic_dataset

from kshot.learners import build_learner
from kshot.training import RunExistsError, TrainConfig, Trainer, load_learner, save_checkpoint
from kshot.training import checkpoint as checkpoint_module
from kshot.training import trainer as trainer_module

BACKBONE = {"name": "conv4", "hidden": 8}


@pytest.fixture
def data():
    return synthetic_dataset(classes=10, per_class=6, size=16, seed=2)


def make(data):
    torch.manual_seed(0)
    return build_learner("protonet", data.image_shape, BACKBONE)


def config(steps, **extra):
    return TrainConfig(ways=3, shots=1, queries=2, steps=steps, val_every=3, val_ways=3, val_queries=2,
                       val_episodes=5, log_every=1, **extra)


def weights(learner):
    return {k: v.clone() for k, v in learner.state_dict().items()}


def test_resumed_run_continues_exactly_where_it_stopped(data, tmp_path):
    straight = make(data)
    Trainer(straight, config(6), tmp_path / "straight", progress=False).fit(data, data)

    first = make(data)
    Trainer(first, config(3), tmp_path / "resumed", progress=False).fit(data, data)
    second = make(data)  # a new process would rebuild the learner from scratch
    trainer = Trainer(second, config(6), tmp_path / "resumed", progress=False)
    trainer.fit(data, data, resume=True)
    assert trainer.step == 6
    for name, value in weights(straight).items():
        assert torch.allclose(value.float(), second.state_dict()[name].float(), atol=1e-6), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    straight_steps = [json.loads(line)["step"]
                      for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert steps == straight_steps


def test_resume_forgets_log_rows_written_after_the_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    Trainer(make(data), config(3), run, progress=False).fit(data, data)
    with open(run / "metrics.jsonl", "a") as log:  # a crash after the checkpoint, before the next one
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    Trainer(make(data), config(6), run, progress=False).fit(data, data, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(4) == 1 and steps == sorted(steps)


def test_existing_run_is_never_silently_overwritten(data, tmp_path):
    Trainer(make(data), config(3), tmp_path, progress=False).fit(data, data)
    with pytest.raises(RunExistsError, match="--resume"):
        Trainer(make(data), config(3), tmp_path, progress=False).fit(data, data)
    Trainer(make(data), config(3), tmp_path, progress=False).fit(data, data, overwrite=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(make(data), config(3), tmp_path / "empty", progress=False).fit(data, data, resume=True)


def test_best_and_last_checkpoints_rebuild_the_learner(data, tmp_path):
    learner = make(data)
    trainer = Trainer(learner, config(6), tmp_path, progress=False)
    history = trainer.fit(data, data)
    assert [row["step"] for row in history] == [3, 6]
    last, info = load_learner(trainer.last_dir)
    assert info["step"] == 6 and info["model"]["learner"] == "protonet"
    assert all(torch.equal(v, learner.state_dict()[k].cpu()) for k, v in last.state_dict().items())
    best, best_info = load_learner(trainer.best_dir)
    assert best_info["best_metric"] == max(row["val_accuracy"] for row in history)


def test_failed_save_keeps_the_previous_checkpoint_whole(data, tmp_path, monkeypatch):
    learner = make(data)
    folder = tmp_path / "last"
    save_checkpoint(folder, learner, {"step": 1})
    with torch.no_grad():
        next(learner.parameters()).add_(1.0)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, learner, {"step": 2})
    restored, info = load_learner(folder)
    assert info["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no partial folder left behind


def test_time_budget_stops_early_and_still_saves(data, tmp_path):
    trainer = Trainer(make(data), config(10_000, time_budget_s=0.5), tmp_path, progress=False)
    history = trainer.fit(data, data)
    assert 0 < trainer.step < 10_000 and history[-1]["step"] == trainer.step
    assert (trainer.last_dir / "model.safetensors").is_file()


def test_time_budget_does_not_validate_a_step_twice(data, tmp_path):
    # Validating every step, the budget always stops the run right after a validation of its last step.
    settings = TrainConfig(**{**vars(config(10_000, time_budget_s=0.5)), "val_every": 1})
    history = Trainer(make(data), settings, tmp_path, progress=False).fit(data, data)
    steps = [row["step"] for row in history]
    assert len(steps) == len(set(steps)) and steps[-1] > 0


def test_unknown_training_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="train.stepz: unknown setting; did you mean 'steps'"):
        TrainConfig.from_dict({"stepz": 3})


def test_linear_schedule_anneals_the_rate_to_lr_final(data, tmp_path):
    Trainer(make(data), config(4, lr=0.01, lr_schedule="linear", lr_final=0.002), tmp_path, progress=False).fit(data)
    rates = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(line)]
    assert rates == pytest.approx([0.008, 0.006, 0.004, 0.002])


def test_unknown_schedule_is_a_clear_error(data, tmp_path):
    with pytest.raises(ValueError, match="lr_schedule"):
        Trainer(make(data), config(2, lr_schedule="exponential"), tmp_path, progress=False).fit(data)


def logged(run, key):
    return [(row["step"], row[key]) for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if key in row]


def test_resume_with_an_lr_schedule_continues_with_the_uninterrupted_rates(data, tmp_path):
    schedule = dict(lr=0.01, lr_schedule="step", lr_decay_every=2, lr_decay=0.5)
    straight = make(data)
    Trainer(straight, config(7, **schedule), tmp_path / "straight", progress=False).fit(data, data)
    Trainer(make(data), config(3, **schedule), tmp_path / "resumed", progress=False).fit(data, data)
    resumed = make(data)  # stopped at step 3, half-way through a decay period
    Trainer(resumed, config(7, **schedule), tmp_path / "resumed", progress=False).fit(data, data, resume=True)
    rates = logged(tmp_path / "straight", "lr")
    assert [rate for _, rate in rates] == pytest.approx([0.01, 0.005, 0.005, 0.0025, 0.0025, 0.00125, 0.00125])
    assert logged(tmp_path / "resumed", "lr") == rates
    for name, value in weights(straight).items():
        assert torch.allclose(value.float(), resumed.state_dict()[name].float(), atol=1e-6), name


def test_model_selection_uses_the_validation_split_only(tmp_path, monkeypatch):
    train = synthetic_dataset(classes=10, per_class=6, size=16, seed=2)
    val = synthetic_dataset(classes=6, per_class=6, size=16, seed=7)  # other classes than train's
    scores = iter([40.0, 90.0, 60.0])  # the middle validation is the best, not the last
    seen, at_step = [], {}
    real = trainer_module.evaluate

    def spy(learner, episodes, **options):
        seen.append(episodes.dataset)
        at_step[len(seen)] = weights(learner)
        return dataclasses.replace(real(learner, episodes, **options), accuracy=next(scores))

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    learner = make(train)
    history = Trainer(learner, config(9), tmp_path / "val", progress=False).fit(train, val)
    assert seen and all(dataset is val for dataset in seen)
    assert [(row["step"], row["val_accuracy"]) for row in history] == [(3, 40.0), (6, 90.0), (9, 60.0)]
    best, info = load_learner(tmp_path / "val" / "checkpoints" / "best")
    assert info["step"] == 6 and info["best_metric"] == 90.0
    for name, value in at_step[2].items():
        assert torch.equal(value, best.state_dict()[name]), name

    seen.clear()  # without a validation split nothing is evaluated (neither train nor test): best is the last
    Trainer(make(train), config(6), tmp_path / "noval", progress=False).fit(train)
    assert seen == [] and load_learner(tmp_path / "noval" / "checkpoints" / "best")[1]["step"] == 6
