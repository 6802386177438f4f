"""Modules lrpcli adds to models: ``Sum`` makes a tensor addition visible to the rules."""

from __future__ import annotations

import torch
from torch import nn


class Sum(nn.Module):
    """``Sum()(a, b, ...)`` returns a + b + ...; as a module it gets a rule (Norm: split by contribution)."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return out


class Gate(nn.Module):
    """``Gate()(x, gate)`` returns x * gate; relevance goes to x only (the gate counts as a constant).

    Multiplicative gates (squeeze-and-excitation) otherwise hand relevance to both factors and break
    conservation; the standard LRP treatment passes it through the gated signal.
    """

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x * gate
