"""Pass-through rules: relevance unchanged (Pass) or routed by the module's own gradient (Gradient).

Pass is for element-wise activations, BatchNorm that is not merged, Dropout, Identity and Flatten: the
relevance at the input equals the relevance at the output. Gradient is for layers whose Jacobian only moves
values around (MaxPool: winner takes all; padding: cropped or folded back) and is the explicit choice where
the plain gradient is wanted.
"""

from __future__ import annotations

import torch
from torch import nn

from lrpcli.engine.modules import Sum
from lrpcli.engine.rules.base import Rule

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
             nn.AdaptiveMaxPool3d)


class Pass(Rule):
    """Relevance unchanged (reshaped to the first input; further inputs, e.g. a Gate's gate, get none)."""

    name = "pass"
    reads = ()
    makes_temporaries = False

    def check(self, module: torch.nn.Module, name: str) -> None:
        if isinstance(module, Sum):
            raise ValueError(f"Pass cannot split relevance between the inputs of {name!r} (Sum); use Norm")

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = call.x
        if relevance.numel() != x.numel():
            raise RuntimeError(
                f"lrpcli: Pass on module {call.name!r} ({type(call.module).__name__}) needs input and output of "
                f"the same size, got {tuple(x.shape)} -> {tuple(relevance.shape)}; give it another rule"
            )
        # the tensor itself where the shapes agree: what the layers above know about its zeros stays with it
        handed = relevance if relevance.shape == x.shape else relevance.reshape(x.shape)
        return (handed,) + (None,) * (len(call.inputs) - 1)


class Gradient(Rule):
    """The module's own gradient (winner-takes-all for MaxPool, crop for padding)."""

    name = "gradient"
    reads = ()  # autograd checks the tensors the module's own backward saved
    needs_graph = True
    is_native_gradient = True

    def keeps_zeros(self, module: torch.nn.Module) -> bool:
        return isinstance(module, MAX_POOLS)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return call.native_vjp(relevance)
