"""An inference-only copy of a backbone, for evaluation with batch-norm running statistics: the same function,
up to float rounding, in fewer and cheaper passes over the activations.

Evaluating a Conv-4 on Omniglot spends nearly all its time in the backbone, and about half of that outside the
convolutions: batch norm, ReLU and max-pooling each read and write every activation. The copy (a `torch.fx`
graph of a deep copy; the backbone given is never changed) applies three rewrites:
- batch norm folded into the convolution before it (`torch.nn.utils.fusion.fuse_conv_bn_eval`): valid with
  running statistics, i.e. in eval mode; one pass fewer;
- a ReLU, ReLU6 or LeakyReLU (non-negative slope) that only feeds a max-pooling moved after it: a max commutes
  with a non-decreasing function, so the result is exactly the same, computed on a quarter of the values;
- on request, weights in channels-last memory format, so that convolution, pooling and activations run on NHWC
  data (each weight with exactly channels-last strides: a first convolution's [64, 1, 3, 3] weight counts as
  contiguous in both formats, and only these strides make its output channels-last).

Measured on one CPU thread, Conv-4 on 640 Omniglot images a pass (this project's shared 2-core machine; process
CPU time): with the other core busy (load about 4), 1,700 images/s for the backbone as given (which already pools
before its ReLU), 4,300 for a channels-last copy, 4,800 for this copy; on the machine while quiet, with the
earlier Conv-4 (ReLU before pooling), 3,900 as given, 3,900 channels-last, 4,700 for this copy. Channels-last
pays most when memory bandwidth is shared; folding and moving activations pay either way. A backbone that
`torch.fx` cannot trace (control flow on tensor values) is copied without the first two rewrites.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
CONVOLUTIONS = ((nn.BatchNorm1d, nn.Conv1d), (nn.BatchNorm2d, nn.Conv2d), (nn.BatchNorm3d, nn.Conv3d))


class _Tracer(fx.Tracer):
    """Keeps convolutions, batch norms, activations and max-poolings as single nodes even when they are
    subclasses defined outside torch.nn (kshot's Conv-4 subclasses nn.Conv2d), so that the rewrites see them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, *ACTIVATIONS, *POOLS)
        return isinstance(m, leaves) or super().is_leaf_module(m, module_qualified_name)


def inference_backbone(backbone: nn.Module, channels_last: bool = False) -> nn.Module:
    """A copy of `backbone` (in eval mode: batch norm on running statistics) that computes the same features
    faster; see the module docstring. `backbone` itself is left as it is."""
    if backbone.training:
        raise ValueError("inference_backbone needs a backbone in eval mode (batch norm on running statistics)")
    module = copy.deepcopy(backbone)
    try:
        graph = fx.GraphModule(module, _Tracer().trace(module))
    except Exception:  # any tracing failure (control flow on tensor values, ...): keep the plain copy
        graph = None
    if graph is not None:
        fold_batch_norm(graph)
        pool_before_activation(graph)
        graph.graph.lint()
        graph.recompile()
        module = graph
    if channels_last:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.dim() == 4:
                tensor.data = torch.empty_like(tensor.data, memory_format=torch.channels_last).copy_(tensor.data)
    return module


def _module(graph: fx.GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return graph.get_submodule(str(node.target))
    return None


def _replace_module(graph: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(graph.get_submodule(parent) if parent else graph, name, module)


def fold_batch_norm(graph: fx.GraphModule) -> int:
    """Fold every eval-mode batch norm whose input is a convolution used by nothing else into that convolution;
    returns how many were folded."""
    folded = 0
    for node in list(graph.graph.nodes):
        norm = _module(graph, node)
        kind = next((conv for bn, conv in CONVOLUTIONS if isinstance(norm, bn)), None)
        if kind is None or norm.training or norm.running_mean is None:
            continue
        source = node.args[0]
        conv = _module(graph, source)
        if not isinstance(conv, kind) or conv.training or len(source.users) != 1:
            continue
        _replace_module(graph, str(source.target), fuse_conv_bn_eval(conv, norm))
        node.replace_all_uses_with(source)
        graph.graph.erase_node(node)
        folded += 1
    graph.delete_all_unused_submodules()
    return folded


def _is_non_decreasing_activation(graph: fx.GraphModule, node: object) -> bool:
    module = _module(graph, node)
    if module is not None:
        if isinstance(module, nn.LeakyReLU):
            return module.negative_slope >= 0 and not module.inplace
        return isinstance(module, (nn.ReLU, nn.ReLU6)) and not module.inplace
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.relu, F.relu) \
        and not node.kwargs.get("inplace", False)


def pool_before_activation(graph: fx.GraphModule) -> int:
    """Rewrite activation -> max-pool as max-pool -> activation wherever the activation (ReLU, ReLU6, LeakyReLU
    with a non-negative slope, not in place) feeds only that pooling (without indices); returns how many."""
    moved = 0
    for pool in list(graph.graph.nodes):
        pooling = _module(graph, pool)
        if not isinstance(pooling, POOLS) or pooling.return_indices:
            continue
        activation = pool.args[0]
        if not _is_non_decreasing_activation(graph, activation) or len(activation.users) != 1:
            continue
        users, source = list(pool.users), activation.args[0]
        pool.replace_input_with(activation, source)
        with graph.graph.inserting_after(pool):
            after = graph.graph.node_copy(activation, lambda n, source=source, pool=pool: pool if n is source else n)
        for user in users:
            user.replace_input_with(pool, after)
        graph.graph.erase_node(activation)
        moved += 1
    return moved
