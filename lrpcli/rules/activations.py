"""Modified ReLU gradients: guided backprop, deconvnet and the beta-smooth (softplus) gradient.

These belong to gradient-space composites: the signal they pass is a (modified) gradient, not relevance.
"""

from __future__ import annotations

import torch

from .base import Rule, check_number


class GuidedBackprop(Rule):
    """Gradient through the ReLU, negative gradients zeroed: (x > 0) * max(R, 0)."""

    name = "guided_backprop"
    reads = ("inputs",)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ((call.x > 0).to(relevance.dtype) * relevance.clamp(min=0),)


class DeconvNet(Rule):
    """The ReLU applied to the backward signal: max(R, 0), regardless of the forward input."""

    name = "deconvnet"
    reads = ()

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (relevance.clamp(min=0),)


class BetaSmooth(Rule):
    """The ReLU's gradient replaced by softplus_beta's: sigmoid(beta * x) * R."""

    name = "beta_smooth"
    reads = ("inputs",)
    shown = ("beta",)

    def __init__(self, beta: float = 10.0) -> None:
        self.beta = check_number("BetaSmooth", "beta", beta, strict=True)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.sigmoid(self.beta * call.x) * relevance,)
