"""Feature extractors shared by every learner, their typed options, and the registry that builds them by name.

| name | module | features |
|---|---|---|
| conv4 | `conv.py` | Conv-4: 64 at 28x28, 1,600 at 84x84 (800 with hidden: 32, MAML's miniImageNet network) |
| resnet12 | `resnet12.py` | ResNet-12 of MetaOptNet / RFS with DropBlock (`dropblock.py`): 640 |
| wrn | `wrn.py` | WRN-28-10 (LEO, S2M2): 640 |
| mlp | `mlp.py` | fully connected layers on flattened input |

`registry.py` holds the registry (a user's own backbones too, by name or import path); `memory.py` estimates
what a backbone needs under second-order MAML.
"""

from __future__ import annotations

from kshot.backbones.conv import Conv4, Conv4Options, conv4_for, conv_block
from kshot.backbones.dropblock import DropBlock
from kshot.backbones.mlp import MLP, MLPOptions, mlp_for
from kshot.backbones.registry import (
    BACKBONES,
    ImportOptions,
    build_backbone,
    import_target,
    module_spec,
    parse_backbone_spec,
    rebuildable,
    register_backbone,
    unrebuildable_message,
)
from kshot.backbones.resnet12 import ResNet12, ResNet12Options, resnet12_for
from kshot.backbones.wrn import WideResNet, WideResNetOptions, wrn_for

register_backbone("conv4", conv4_for, Conv4Options)
register_backbone("mlp", mlp_for, MLPOptions)
register_backbone("resnet12", resnet12_for, ResNet12Options)
register_backbone("wrn", wrn_for, WideResNetOptions)

__all__ = ["BACKBONES", "MLP", "Conv4", "Conv4Options", "DropBlock", "ImportOptions", "MLPOptions", "ResNet12",
           "ResNet12Options", "WideResNet", "WideResNetOptions", "build_backbone", "conv4_for", "conv_block",
           "import_target", "module_spec", "parse_backbone_spec", "rebuildable", "register_backbone",
           "unrebuildable_message"]
