"""Squeeze-and-excitation gates: ``x * scale`` becomes ``Gate()(x, scale)`` so relevance stays on x.

torchvision's SqueezeExcitation (EfficientNet, MobileNetV3, RegNet) gets a ``Gate`` child and a forward that
uses it for the duration of the session.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrpcli.engine.canonizers.base import Canonizer
from lrpcli.engine.modules import Gate

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.engine.hooks import Session

GATE_NAME = "lrpcli_gate"


def _se_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return getattr(self, GATE_NAME)(x, self._scale(x))


class SqueezeExcitationGates(Canonizer):
    """torchvision SqueezeExcitation: the channel gate no longer takes relevance."""

    name = "se_gates"

    def __init__(self) -> None:
        self._patched: list[nn.Module] = []

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        from torchvision.ops import SqueezeExcitation

        count = 0
        for module in model.modules():
            if isinstance(module, SqueezeExcitation) and "forward" not in module.__dict__:
                module.add_module(GATE_NAME, Gate())
                module.forward = types.MethodType(_se_forward, module)
                self._patched.append(module)
                count += 1
        if count:
            session.notes.append(f"se_gates: {count} squeeze-and-excitation gates pass relevance to the gated signal")
        return model

    def revert(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
            module._modules.pop(GATE_NAME, None)
        self._patched.clear()
