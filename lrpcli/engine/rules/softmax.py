"""Softmax rule of AttnLRP (Achtibat et al., ICML 2024, Proposition 3.1).

A first-order Taylor decomposition of s = softmax(x) at the input, keeping the part that is linear in x (the
"bias" of the expansion is absorbed, as the Epsilon rule absorbs a layer's bias):

    R_i = x_i * sum_j (ds_j / dx_i) R_j / s(s_j) = x_i * (R_i - s_i * sum_j R_j)        (epsilon -> 0)

It is not conservative: sum_i R_i = sum_i x_i R_i - (sum_i x_i s_i) sum_j R_j. CP-LRP (Ali et al., ICML 2022)
instead treats the attention weights as constants, so no relevance enters the softmax at all: that choice is
made where the weights are used (``ConstantOperand`` on the attention-times-values product), not here.
Inputs of -inf (masked scores) get no relevance.
"""

from __future__ import annotations

import torch
from torch import nn

from lrpcli.engine.rules.base import StabilizedRule


def softmax_dim(module: nn.Module, x: torch.Tensor) -> int:
    """The dimension an nn.Softmax normalises (its legacy default where dim is None)."""
    dim = getattr(module, "dim", None)
    if dim is None:
        return 0 if x.dim() in (0, 1, 3) else 1
    return dim


class SoftmaxRule(StabilizedRule):
    """AttnLRP's softmax rule: R_i = x_i (R_i - s_i sum_j R_j), with the stabilizer on the denominator s_j."""

    name = "softmax"
    proportional_to_inputs = True

    def check(self, module: nn.Module, name: str) -> None:
        if not isinstance(module, nn.Softmax):
            raise ValueError(f"SoftmaxRule applies to Softmax; module {name!r} is {type(module).__name__}")

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, s = call.x, call.output
        dim = softmax_dim(call.module, x)
        ratio = self.stabilizer.divide(relevance, s)
        # J^T v for the softmax: s_i (v_i - sum_j s_j v_j)
        grad = s * (ratio - (s * ratio).sum(dim=dim, keepdim=True))
        result = torch.where(torch.isfinite(x), x * grad, 0.0)
        return (result,)
