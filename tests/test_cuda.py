"""The CUDA path (skipped without a GPU): episodes gathered on the GPU, training, resume and evaluation there."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_dataset

from kshot.data import EpisodeSampler, EpisodeSet
from kshot.evaluation import evaluate
from kshot.learners import build_learner
from kshot.training import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_episodes_on_the_gpu_equal_those_on_the_cpu():
    data = synthetic_dataset(size=16).with_rotations((0, 90, 180, 270))
    cpu, gpu = EpisodeSampler(data, 5, 2, 3, seed=4), EpisodeSampler(data.to("cuda"), 5, 2, 3, seed=4)
    for _ in range(3):
        a, b = cpu.sample_batch(4), gpu.sample_batch(4)
        assert b.support_x.is_cuda and b.query_y.is_cuda
        # the same images (float division may differ in the last bit between devices)
        assert torch.allclose(a.support_x, b.support_x.cpu(), rtol=0, atol=1e-6)
        assert torch.equal(a.classes, b.classes.cpu()) and torch.equal(a.query_y, b.query_y.cpu())


def test_training_resume_and_evaluation_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    data = synthetic_dataset(classes=10, per_class=6, size=16).to("cuda")
    config = TrainConfig(ways=3, shots=1, queries=2, steps=6, val_every=3, val_ways=3, val_queries=2,
                         val_episodes=5)
    torch.manual_seed(0)
    straight = build_learner("protonet", data.image_shape, {"name": "conv4", "hidden": 8})
    Trainer(straight, config, tmp_path / "a", device="cuda", progress=False).fit(data, data)
    torch.manual_seed(0)
    half = build_learner("protonet", data.image_shape, {"name": "conv4", "hidden": 8})
    Trainer(half, TrainConfig(**{**config.__dict__, "steps": 3}), tmp_path / "b", device="cuda",
            progress=False).fit(data, data)
    torch.manual_seed(0)
    resumed = build_learner("protonet", data.image_shape, {"name": "conv4", "hidden": 8})
    Trainer(resumed, config, tmp_path / "b", device="cuda", progress=False).fit(data, data, resume=True)
    for name, value in straight.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[name].float(), atol=1e-5), name
    episodes = EpisodeSet(data, 3, 1, 2, 20, seed=0)
    on_gpu = evaluate(straight, episodes, progress=False)
    on_cpu = evaluate(straight.cpu(), EpisodeSet(data.to("cpu"), 3, 1, 2, 20, seed=0), device="cpu", progress=False)
    assert abs(on_gpu.accuracy - on_cpu.accuracy) <= 100 / 120 + 1e-6  # at most one near-tie query flips
