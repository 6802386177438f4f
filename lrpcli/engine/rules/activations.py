"""Modified ReLU gradients: guided backprop, deconvnet and the beta-smooth (softplus) gradient.

These belong to gradient-space composites: the signal they pass is a (modified) gradient, not relevance.
"""

from __future__ import annotations

import torch
from torch import nn

from lrpcli.engine.rules.base import Rule, check_number


class GuidedBackprop(Rule):
    """Gradient through the ReLU, negative gradients zeroed: (x > 0) * max(R, 0)."""

    name = "guided_backprop"
    reads = ("inputs",)

    def reads_of(self, module: torch.nn.Module) -> tuple[str, ...]:
        # for ReLU-like modules f(x) > 0 exactly where x > 0: the output, which the next layer keeps anyway,
        # answers the question, and the input (a whole activation) can be freed
        return ("output",) if _positive_where_input_is(module) else self.reads

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = call.output > 0 if _positive_where_input_is(call.module) else call.x > 0
        return (mask.to(relevance.dtype) * relevance.clamp(min=0),)


def _positive_where_input_is(module: torch.nn.Module) -> bool:
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return True
    return isinstance(module, nn.LeakyReLU) and module.negative_slope >= 0


class DeconvNet(Rule):
    """The ReLU applied to the backward signal: max(R, 0), regardless of the forward input."""

    name = "deconvnet"
    reads = ()

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (relevance.clamp(min=0),)


class BetaSmooth(Rule):
    """The ReLU's gradient replaced by softplus_beta's: sigmoid(beta * x) * R.

    Reads only the input x, never the output: on a ReLU the session keeps x alone and recomputes relu(x) where
    autograd saved it for the next layer (see ``lrpcli.engine.hooks``), so the memory stays that of the plain gradient.
    """

    name = "beta_smooth"
    reads = ("inputs",)
    shown = ("beta",)

    def __init__(self, beta: float = 10.0) -> None:
        self.beta = check_number("BetaSmooth", "beta", beta, strict=True)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.sigmoid(self.beta * call.x) * relevance,)
