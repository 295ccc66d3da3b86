"""The sinusoid task family: shapes, ranges, seeding, the resumable stream, and regression MAML on it
(directly and through the unchanged Trainer)."""

from __future__ import annotations

import math

import pytest
import torch

from kshot.data.sinusoid import SinusoidTasks
from kshot.learners import EpisodeShape, build_learner
from kshot.training.trainer import TrainConfig, Trainer

NETWORK = {"name": "mlp", "hidden": [40, 40], "out_features": 1}



def regression_maml(**options):
    torch.manual_seed(0)
    return build_learner("maml", (1, 1, 1), NETWORK, {"task": "regression", "inner_lr": 0.01, **options})


def test_tasks_have_the_paper_distribution_and_shapes():
    tasks = SinusoidTasks()
    batch = tasks.sample_batch(400, 10, 7, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (400, 10, 1) and batch.query_y.shape == (400, 7, 1)
    assert batch.is_batched and batch.batch_size == 400 and batch.support_x.dtype == torch.float32
    amplitude, phase = batch.classes[:, 0], batch.classes[:, 1]
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and 0 <= phase.min() and phase.max() <= math.pi
    assert -5 <= batch.support_x.min() and batch.query_x.max() <= 5
    expected = amplitude[:, None, None] * torch.sin(batch.query_x - phase[:, None, None])
    torch.testing.assert_close(batch.query_y, expected)
    single = tasks.sample(5, 3, torch.Generator().manual_seed(1))
    assert not single.is_batched and single.support_y.shape == (5, 1)
    with pytest.raises(ValueError, match="low < high"):
        SinusoidTasks(amplitude=(5.0, 0.1))


def test_seeding_and_stream_resume():
    tasks = SinusoidTasks()
    a, b = tasks.test_set(3, 5, 5, seed=4), tasks.test_set(3, 5, 5, seed=4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.classes, b.classes)
    stream = tasks.stream(EpisodeShape(ways=1, shots=4, queries=4, meta_batch=2), seed=0)
    next(stream)
    state = stream.state_dict()
    expected = next(stream)
    stream.load_state_dict(state)
    assert torch.equal(next(stream).query_y, expected.query_y)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_regression_maml_learns_the_family(strategy):
    model = regression_maml(strategy=strategy)
    stream = SinusoidTasks().stream(EpisodeShape(ways=1, shots=10, queries=10, meta_batch=8), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, metrics = model.loss(next(stream))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert "mse" in metrics
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    task = SinusoidTasks().sample(5, 20, torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert model.adapt(task.support_x, task.support_y)(task.query_x).shape == (20, 1)


def test_loop_and_vmap_give_the_same_regression_meta_gradient():
    batch = SinusoidTasks().sample_batch(4, 10, 10, torch.Generator().manual_seed(0))
    grads = []
    for strategy in ("loop", "vmap"):
        model = regression_maml(strategy=strategy, inner_steps=2)
        model.loss(batch)[0].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_trainer_trains_regression_maml_on_the_task_family(tmp_path):
    config = TrainConfig(shots=10, queries=10, meta_batch=4, steps=5, val_every=0, log_every=1)
    trainer = Trainer(regression_maml(), config, tmp_path / "run", progress=False)
    trainer.fit(SinusoidTasks())
    assert trainer.step == 5 and (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").is_file()
