"""Residual additions as modules, so relevance is split by contribution instead of copied to both branches.

``TorchvisionResidualBlocks`` (part of ``resnet``) gives torchvision's BasicBlock and Bottleneck a ``Sum``
child and a forward that uses it, for the duration of the session. ``ResidualAdditions`` (``residual``) does
the same for any model torch.fx can trace: every tensor + tensor becomes a call of a new ``Sum`` module in a
traced copy of the model that shares all modules and parameters with the original.
"""

from __future__ import annotations

import operator
import types
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from lrpcli.engine.canonizers.base import Canonizer
from lrpcli.engine.modules import Gate, Sum

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.engine.hooks import Session

SUM_NAME = "lrpcli_sum"


def _basic_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = self.downsample(x) if self.downsample is not None else x
    return self.relu(getattr(self, SUM_NAME)(out, identity))


def _bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = self.downsample(x) if self.downsample is not None else x
    return self.relu(getattr(self, SUM_NAME)(out, identity))


class TorchvisionResidualBlocks(Canonizer):
    """torchvision ResNet blocks: ``out += identity`` becomes ``Sum()(out, identity)``."""

    name = "resnet_blocks"

    def __init__(self) -> None:
        self._patched: list[nn.Module] = []

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        for name, module in model.named_modules():
            if isinstance(module, (BasicBlock, Bottleneck)) and "forward" not in module.__dict__:
                forward = _basic_forward if isinstance(module, BasicBlock) else _bottleneck_forward
                module.add_module(SUM_NAME, Sum())
                module.forward = types.MethodType(forward, module)
                self._patched.append(module)
                session.notes.append(f"{name}: residual addition routed through {name}.{SUM_NAME}")
        return model

    def revert(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
            if SUM_NAME in module._modules:
                del module._modules[SUM_NAME]
        self._patched.clear()


_ADDS = {operator.add, operator.iadd, torch.add}


class _Tracer(fx.Tracer):
    """Keeps lrpcli's own modules (Sum, Gate) as calls, so earlier canonizers' work survives tracing."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Sum, Gate)) or super().is_leaf_module(m, qualname)


class ResidualAdditions(Canonizer):
    """Any fx-traceable model: tensor + tensor in ``forward`` becomes a ``Sum`` module call."""

    name = "residual"

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        try:
            graph = _Tracer().trace(model)
            traced = fx.GraphModule(model, graph, type(model).__name__)
        except Exception as err:  # fx raises many kinds of errors on untraceable code
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"canonizer 'residual': torch.fx cannot trace {type(model).__name__} ({reason}); write the "
                "additions as lrpcli.Sum() modules in the model, or use a model-specific canonizer"
            ) from None
        count = 0
        for node in list(traced.graph.nodes):
            is_add = (node.op == "call_function" and node.target in _ADDS) or (
                node.op == "call_method" and node.target in ("add", "add_"))
            if not is_add or len(node.args) != 2 or node.kwargs:
                continue
            if not all(isinstance(a, fx.Node) for a in node.args):
                continue
            name = f"{SUM_NAME}_{count}"
            count += 1
            traced.add_submodule(name, Sum())
            with traced.graph.inserting_after(node):
                new = traced.graph.call_module(name, tuple(node.args))
            node.replace_all_uses_with(new)
            traced.graph.erase_node(node)
        traced.recompile()
        session.notes.append(f"residual: {count} tensor additions in {type(model).__name__} routed through Sum")
        return traced
