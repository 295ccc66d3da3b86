"""Backbones for natural images (issue 11, item 3): feature sizes at 84x84, published parameter counts, DropBlock,
functional use under MAML, every registered learner on ResNet-12, and the second-order MAML memory bound.

Full-size networks are built on the "meta" device (shapes without memory or compute), so these tests stay fast."""

from __future__ import annotations

import warnings
from itertools import islice
from typing import Any

import pytest
import torch
from conftest import synthetic_dataset
from torch import nn

from kshot.backbones import BACKBONES, DropBlock, build_backbone, memory, parse_backbone_spec
from kshot.config import ConfigError
from kshot.data.sampler import EpisodeSet
from kshot.learners import LEARNERS, build_learner
from kshot.learners.base import EpisodeShape

IMAGE = (3, 84, 84)


def on_meta(spec: Any, image_shape: tuple[int, int, int] = IMAGE) -> tuple[nn.Module, torch.Size]:
    """The backbone built on the meta device and the shape of its output for one image."""
    with torch.device("meta"):
        backbone = build_backbone(spec, image_shape)
        return backbone, backbone(torch.empty(1, *image_shape)).shape[1:]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- feature sizes
@pytest.mark.parametrize(("spec", "shape"), [
    ("conv4", (1600,)),                                          # 64 * 5 * 5
    ({"name": "conv4", "hidden": 32}, (800,)),                   # MAML's miniImageNet network: 32 * 5 * 5
    ("resnet12", (640,)),
    ({"name": "resnet12", "avg_pool": False, "flatten": False}, (640, 5, 5)),
    ({"name": "resnet12", "avg_pool": False}, (16000,)),         # MetaOptNet's flattened 640 x 5 x 5
    ("wrn", (640,)),
    ({"name": "wrn", "avg_pool": False, "flatten": False}, (640, 21, 21)),
])
def test_feature_sizes_at_84x84(spec, shape):
    assert tuple(on_meta(spec)[1]) == shape


def test_real_forward_of_a_small_resnet12_matches_its_meta_shape():
    spec = {"name": "resnet12", "widths": [8, 16, 24, 32], "avg_pool": False, "flatten": False}
    backbone = build_backbone(spec, IMAGE).eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, *IMAGE)).shape == (2, 32, 5, 5)


# --------------------------------------------------------------------------------------------- parameter counts
# Reference counts: ResNet-12 (64-160-320-640) 12.4M, the figure few-shot papers quote for it; WRN-28-10 36.5M
# (Zagoruyko and Komodakis 2016, their table of CIFAR results). Ours exclude any classifier layer.
PUBLISHED = [("resnet12", 12.4e6, 12_424_320), ("wrn", 36.5e6, 36_472_784)]


@pytest.mark.parametrize(("name", "published", "exact"), PUBLISHED)
def test_parameter_counts_match_the_published_ones(name, published, exact):
    count = parameter_count(on_meta(name)[0])
    assert count == exact
    assert abs(count - published) / published < 0.01


# ------------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "resnet12", "widths": [8, 16, 24]}, "backbone.widths: input should be four widths"),
    ({"name": "resnet12", "drop_rate": 1.0}, "backbone.drop_rate: input should be less than 1"),
    ({"name": "resnet12", "dropblock": 5}, "did you mean 'dropblock_size'"),
    ({"name": "wrn", "depth": 27}, "backbone.depth: input should be 6n \\+ 4"),
    ({"name": "wrn", "dropout": -0.1}, "backbone.dropout: input should be greater than or equal to 0"),
])
def test_bad_options_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_backbone_spec(spec)


def test_resnet12_refuses_images_too_small_for_its_four_pools():
    with pytest.raises(ConfigError, match="at least 16x16, got 3x12x12"):
        build_backbone("resnet12", (3, 12, 12))


def test_natural_image_backbones_are_registered():
    assert {"conv4", "mlp", "resnet12", "wrn"} <= set(BACKBONES)


# ---------------------------------------------------------------------------------------------------- DropBlock
def test_dropblock_is_the_identity_in_eval_mode_and_seeded_in_training():
    layer = DropBlock(rate=0.3, block_size=3)
    x = torch.randn(4, 8, 10, 10)
    assert layer.eval()(x) is x
    layer.train()
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(first, layer(x))
    assert not torch.equal(first, layer(x))  # the next draw differs


def test_dropblock_drops_about_rate_of_the_units_in_square_blocks_and_keeps_the_mean():
    torch.manual_seed(0)
    out = DropBlock(rate=0.1, block_size=5).train()(torch.ones(64, 16, 20, 20))
    dropped = out == 0
    assert 0.06 < dropped.float().mean().item() < 0.14
    assert out.mean().item() == pytest.approx(1.0, abs=1e-5)  # kept units are rescaled
    # Every dropped unit lies in a wholly dropped 5x5 square: the map equals its morphological opening.
    maps = dropped.reshape(-1, 1, 20, 20).float()
    squares = -nn.functional.max_pool2d(-maps, 5, stride=1)  # 1 where the 5x5 square from (i, j) is all dropped
    opened = nn.functional.max_pool2d(nn.functional.pad(squares, [4] * 4), 5, stride=1)
    assert torch.equal(opened, maps)


def test_dropblock_ramp_counts_training_passes_in_a_saved_buffer():
    layer = DropBlock(rate=0.2, block_size=3, ramp=4).train()
    rates = []
    for _ in range(6):
        rates.append(layer.current_rate())
        layer(torch.randn(2, 3, 6, 6))
    assert rates == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    layer.eval()(torch.randn(2, 3, 6, 6))
    assert int(layer.state_dict()["seen"]) == 6  # eval passes do not count


def test_dropblock_clips_its_block_to_small_maps():
    torch.manual_seed(0)
    out = DropBlock(rate=0.5, block_size=5).train()(torch.ones(8, 4, 2, 2))
    assert out.shape == (8, 4, 2, 2) and bool(torch.isfinite(out).all())


# ------------------------------------------------------------------------------------------- functional use
SMALL = {"name": "resnet12", "widths": [8, 16, 24, 32]}
SMALL_IMAGE = (3, 32, 32)


def test_resnet12_runs_under_functional_call_with_dropblock_and_batch_norm():
    backbone = build_backbone({**SMALL, "drop_rate": 0.3, "dropblock_size": 2}, SMALL_IMAGE).train()
    x = torch.randn(6, *SMALL_IMAGE)
    params = dict(backbone.named_parameters())
    torch.manual_seed(1)
    direct = backbone(x)
    torch.manual_seed(1)
    functional = torch.func.functional_call(backbone, params, (x,))
    torch.testing.assert_close(functional, direct)


def test_dropblock_without_a_ramp_runs_under_torch_func_transforms():
    # (Batch norm in training mode cannot: it updates its running statistics in place, as a ramp's counter does.)
    layer = DropBlock(rate=0.2, block_size=3).train()
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    grad = torch.func.grad(lambda t: layer(t).sum())(x)
    torch.manual_seed(0)
    assert torch.equal(grad, layer(torch.ones_like(x)))  # d(sum(x * mask * scale))/dx = mask * scale
    assert torch.func.vmap(layer, randomness="different")(x[None].expand(4, -1, -1, -1, -1)).shape == (4, *x.shape)


def test_second_order_maml_on_resnet12_reaches_every_backbone_parameter():
    torch.manual_seed(0)
    learner = build_learner("maml", SMALL_IMAGE, {**SMALL, "dropblock_ramp": 10},
                            {"inner_steps": 2, "inner_lr": 0.01, "strategy": "loop"})
    learner.train()
    loss, _ = learner.loss(training_batch(learner))
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in learner.backbone.parameters())
    counts = [int(b) for n, b in learner.backbone.named_buffers() if n.endswith("seen")]
    assert counts == [6, 6]  # the two DropBlocks: 2 tasks x (2 inner steps + the query pass)


def test_vmap_strategy_on_resnet12_with_a_dropblock_ramp_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy 'vmap' needs a network whose only buffers are batch norm's"):
        build_learner("maml", SMALL_IMAGE, {**SMALL, "dropblock_ramp": 10}, {"strategy": "vmap"})


# ---------------------------------------------------------------------------------- every learner on ResNet-12
WAYS, SHOTS, QUERIES = 5, 1, 2
DATASET = synthetic_dataset(classes=10, per_class=6, size=32, channels=3, seed=0)
MAPS = {**SMALL, "avg_pool": False, "flatten": False}  # 32x32 -> 32 x 2 x 2 maps for Relation Networks
OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {"batch_size": 8, "adapt_epochs": 2},
    "baseline++": {"batch_size": 8, "adapt_epochs": 2},
    "simpleshot": {"batch_size": 8},
    "siamese": {"batch_size": 8},
    "matching": {"fce": True, "processing_steps": 2},
    "relation": {"relation_channels": 8, "relation_hidden": 4},
    "maml": {"inner_lr": 0.01, "test_inner_steps": 2, "strategy": "loop"},
    "anil": {"inner_lr": 0.01, "test_inner_steps": 2},
    "metasgd": {"inner_lr": 0.01, "test_inner_steps": 2},
    "reptile": {"inner_steps": 2, "test_inner_steps": 2, "inner_lr": 0.01},
}


def training_batch(learner: Any) -> Any:
    return next(islice(learner.training_stream(DATASET, EpisodeShape(WAYS, SHOTS, QUERIES, meta_batch=2), 0), 1))


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_trains_and_adapts_on_resnet12(name):
    torch.manual_seed(0)
    learner = build_learner(name, SMALL_IMAGE, MAPS if name == "relation" else SMALL, OPTIONS.get(name, {}))
    learner.prepare(DATASET)
    learner.train()
    loss, _ = learner.loss(training_batch(learner))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in learner.backbone.parameters())
    learner.eval()
    task = EpisodeSet(DATASET, WAYS, SHOTS, QUERIES, count=1, seed=1)[0]
    with torch.no_grad():
        logits = learner.adapt(task.support_x, task.support_y)(task.query_x)
    assert logits.shape == (WAYS * QUERIES, WAYS) and bool(torch.isfinite(logits).all())


def test_relation_on_pooled_features_says_what_to_set():
    with pytest.raises(ValueError, match="set flatten: false"):
        build_learner("relation", SMALL_IMAGE, SMALL)


# ------------------------------------------------------------------------------------------ MAML memory bound
def test_memory_formula_reproduces_the_documented_full_size_figures():
    with torch.device("meta"):
        backbone = build_backbone("resnet12", IMAGE)
    activations, parameters = memory.activation_elements(backbone, IMAGE), parameter_count(backbone)
    assert activations == 10_791_296
    gib = [memory.maml_memory_bytes(activations, parameters, 5, 75, 5, tasks) / 2**30 for tasks in (1, 4)]
    assert gib == pytest.approx([5.7, 21.8], abs=0.05)  # the module docstring's table
    first_order = memory.maml_memory_bytes(activations, parameters, 5, 75, 5, 4, first_order=True)
    anil = memory.maml_memory_bytes(activations, parameters, 5, 75, 5, 4, adapts_backbone=False)
    assert first_order < gib[1] * 2**30 and anil < first_order


def small_maml(**options: Any) -> Any:
    return build_learner("maml", SMALL_IMAGE, SMALL, {"inner_lr": 0.01, "strategy": "loop", **options})


def test_a_meta_step_estimated_not_to_fit_warns_once_in_one_line(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    learner = small_maml(inner_steps=2)
    batch = training_batch(learner)
    with pytest.warns(memory.MAMLMemoryWarning) as caught:
        learner.loss(batch)
    message = str(caught[0].message)
    assert "\n" not in message and "maml: a second-order meta-step of 2 task(s)" in message
    assert "set first_order: true" in message  # one task alive already (backward per_task): no advice for it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.loss(batch)  # the same setting again: no second warning


def test_per_task_backward_counts_one_task_alive(monkeypatch):
    sizes = []
    monkeypatch.setattr(memory, "available_memory", lambda device: 10**15)
    monkeypatch.setattr(memory, "maml_memory_bytes", lambda *args, **kw: sizes.append(args[5]) or 0)
    for per_task in (False, True):
        learner = small_maml(per_task_backward=per_task)
        learner.loss(training_batch(learner))
    assert sizes == [2, 1]
