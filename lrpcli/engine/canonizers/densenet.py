"""torchvision DenseNet: the head's functional ``F.relu`` and ``adaptive_avg_pool2d`` become modules.

As functions they pass the plain gradient: the pool spreads relevance uniformly, also onto positions the ReLU
zeroed, and that relevance is lost. As modules they get Pass and Norm like everywhere else.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrpcli.engine.canonizers.base import Canonizer

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.engine.hooks import Session

HEAD = ("lrpcli_relu", "lrpcli_pool")


def _densenet_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.lrpcli_pool(self.lrpcli_relu(self.features(x)))
    return self.classifier(torch.flatten(out, 1))


class DenseNetHead(Canonizer):
    """Module ReLU and average pool in the head of torchvision DenseNets."""

    name = "densenet_head"

    def __init__(self) -> None:
        self._patched: list[nn.Module] = []

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        from torchvision.models.densenet import DenseNet

        for module in model.modules():
            if isinstance(module, DenseNet) and "forward" not in module.__dict__:
                module.add_module(HEAD[0], nn.ReLU())
                module.add_module(HEAD[1], nn.AdaptiveAvgPool2d((1, 1)))
                module.forward = types.MethodType(_densenet_forward, module)
                self._patched.append(module)
                session.notes.append("densenet: head ReLU and average pool run as modules")
        return model

    def revert(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
            for name in HEAD:
                module._modules.pop(name, None)
        self._patched.clear()
