"""The inference copy of a backbone (kshot.inference): the same features up to float rounding, batch norm folded
into convolutions, activations moved after max-pooling only where that is exact, the backbone given untouched."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from kshot.backbones import build_backbone
from kshot.inference import _Tracer, fold_batch_norm, inference_backbone, pool_before_activation


def with_running_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` in eval mode with batch-norm statistics and affine parameters away from their initial values."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            size = layer.num_features
            layer.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            layer.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    return module.eval()


BACKBONES = {
    "conv4": ({"name": "conv4", "hidden": 8}, (1, 28, 28)),
    "conv4-maps": ({"name": "conv4", "hidden": 8, "flatten": False}, (1, 28, 28)),
    "conv4-rgb": ({"name": "conv4", "hidden": 8}, (3, 32, 32)),
    "resnet12": ({"name": "resnet12", "widths": [4, 6, 8, 10]}, (3, 32, 32)),
    "mlp": ({"name": "mlp", "hidden": [12]}, (1, 6, 6)),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("key", BACKBONES)
def test_the_copy_computes_the_backbone_features_and_leaves_the_backbone_alone(key, channels_last):
    spec, shape = BACKBONES[key]
    torch.manual_seed(0)
    backbone = with_running_statistics(build_backbone(spec, shape))
    state = {name: value.clone() for name, value in backbone.state_dict().items()}
    copy = inference_backbone(backbone, channels_last=channels_last)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = backbone(x)
        got = copy(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())  # every one folded
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, state[name]) and value.is_contiguous(), name
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in build_backbone(spec, shape).modules())


def test_channels_last_gives_every_convolution_weight_channels_last_strides():
    backbone = with_running_statistics(build_backbone({"name": "conv4", "hidden": 8}, (1, 28, 28)))
    convolutions = [m for m in inference_backbone(backbone, channels_last=True).modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) == 4
    for conv in convolutions:  # including the first, [8, 1, 3, 3], contiguous in both layouts
        expected = torch.empty_like(conv.weight, memory_format=torch.channels_last).stride()
        assert conv.weight.stride() == expected
    assert convolutions[0].weight.stride() != (9, 9, 3, 1)


def order(graph: fx.GraphModule) -> list[str]:
    return [type(graph.get_submodule(str(node.target))).__name__ for node in graph.graph.nodes
            if node.op == "call_module"]


def traced(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, _Tracer().trace(module))


def test_an_activation_feeding_only_a_max_pool_moves_after_it_with_exactly_the_same_result():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.LeakyReLU(0.1), nn.MaxPool2d(2, padding=1), nn.Conv2d(3, 3, 1),
                        nn.ReLU(), nn.MaxPool2d(3, stride=2, ceil_mode=True)).eval()
    graph = traced(net)
    assert pool_before_activation(graph) == 2
    graph.recompile()
    assert order(graph) == ["Conv2d", "MaxPool2d", "LeakyReLU", "Conv2d", "MaxPool2d", "ReLU"]
    x = torch.randn(4, 2, 11, 11)
    assert torch.equal(graph(x), net(x))


class Branching(nn.Module):
    """Rewrites that would be wrong: an activation read elsewhere too, a non-monotone one, an in-place one, a
    negative slope, a convolution whose output another branch reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.relu, self.gelu = nn.ReLU(), nn.GELU()
        self.inplace, self.negative = nn.ReLU(inplace=True), nn.LeakyReLU(-0.5)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        conv = self.conv(x)
        shared = self.relu(self.norm(conv) + conv)
        return (self.pool(shared) + self.pool(self.gelu(x)) + self.pool(self.inplace(x + 1))
                + self.pool(self.negative(x))).sum((1, 2, 3)) + shared.mean((1, 2, 3))


def test_rewrites_that_would_change_the_result_are_not_made():
    torch.manual_seed(0)
    net = with_running_statistics(Branching())
    graph = traced(net)
    assert pool_before_activation(graph) == 0
    assert fold_batch_norm(graph) == 0  # the convolution's output is also added to the normalised one
    copy = inference_backbone(net)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(copy(x), net(x))


def test_a_backbone_fx_cannot_trace_is_copied_as_it_is():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            out = self.norm(self.conv(x))
            return out.flatten(1) if out.sum() > 0 else -out.flatten(1)  # control flow on a tensor's value

    net = with_running_statistics(DataDependent())
    copy = inference_backbone(net, channels_last=True)
    assert copy is not net and isinstance(copy, DataDependent)
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(copy(x.contiguous(memory_format=torch.channels_last)), net(x))


def test_a_backbone_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        inference_backbone(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))
