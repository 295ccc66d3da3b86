"""Conv-4's speed-motivated layout choices (issue 12, item 3): max-pool before ReLU gives bit-identical outputs,
gradients and running statistics to the textbook ReLU-then-pool order; the opt-in channels-last layout computes
the same function with ordinary parameters, under MAML's loop and vmap strategies alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kshot.backbones import build_backbone
from kshot.backbones.conv import Conv4
from kshot.learners import build_learner


def textbook_forward(model: Conv4, x: torch.Tensor, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Conv, batch norm (training mode, updating `stats`), ReLU, then 2x2 max-pool, written with torch.nn.functional
    from the model's own parameters: Vinyals, Snell and Finn's block in their order."""
    for block, (mean, var) in zip(model.encoder, stats, strict=True):
        conv, norm = block[0], block[1]
        x = F.conv2d(x, conv.weight, conv.bias, padding=1)
        x = F.batch_norm(x, mean, var, norm.weight, norm.bias, True, norm.momentum, norm.eps)
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1)


def test_pool_before_relu_is_bit_identical_to_the_textbook_order():
    torch.manual_seed(0)
    model = Conv4(hidden=8).train()
    x = torch.randint(0, 256, (12, 1, 28, 28)).float() / 255 - 0.3
    stats = [(torch.zeros(8), torch.ones(8)) for _ in model.encoder]
    expected = textbook_forward(model, x, stats)
    loss = (expected.square() + expected).sum()
    expected_grads = torch.autograd.grad(loss, list(model.parameters()))
    out = model(x)
    grads = torch.autograd.grad((out.square() + out).sum(), list(model.parameters()))
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    for block, (mean, var) in zip(model.encoder, stats, strict=True):
        assert torch.equal(block[1].running_mean, mean) and torch.equal(block[1].running_var, var)
    assert [type(m).__name__ for m in model.encoder[0]] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"]


def test_channels_last_computes_the_same_function_with_ordinary_parameters():
    torch.manual_seed(0)
    fast = build_backbone({"name": "conv4", "hidden": 8, "channels_last": True}, (1, 28, 28)).train()
    plain = build_backbone({"name": "conv4", "hidden": 8}, (1, 28, 28)).train()
    plain.load_state_dict(fast.state_dict())
    x = torch.rand(10, 1, 28, 28)
    outs, grads = [], []
    for model in (fast, plain):
        out = model(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), list(model.parameters())))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(*grads, strict=True):  # channels-last batch norm sums less precisely (see conv.py)
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)
    assert all(p.is_contiguous() for p in fast.parameters())  # checkpoints and optimisers see the usual layout
    maps = build_backbone({"name": "conv4", "hidden": 8, "channels_last": True, "flatten": False}, (1, 28, 28))
    assert maps(x).is_contiguous()  # feature maps come back in the usual layout (a .view of them works)


def test_maml_loop_and_vmap_run_a_channels_last_conv4():
    from kshot.data.dataset import ClassDataset
    from kshot.data.sampler import EpisodeSampler

    images = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = EpisodeSampler(ClassDataset(images, torch.arange(0, 25, 4), [f"c{i}" for i in range(6)]), 3, 1, 2,
                           seed=0).sample_batch(2)
    grads = []
    for strategy in ("loop", "vmap"):
        torch.manual_seed(0)
        model = build_learner("maml", (1, 16, 16), {"name": "conv4", "hidden": 4, "depth": 2, "channels_last": True},
                              {"ways": 3, "inner_lr": 0.3, "strategy": strategy}).train()
        model.loss(batch)[0].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
