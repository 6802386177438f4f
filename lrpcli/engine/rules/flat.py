"""Flat and WSquare: relevance distributed by connectivity or by squared weights, independent of the input.

Flat: R_i = sum_j 1[i feeds j] R_j / s(#inputs feeding j) (bias ignored; zero padding is not an input).
WSquare: R_i = sum_j W_ji^2 R_j / s(sum_i W_ji^2 + b_j^2).
"""

from __future__ import annotations

import torch

from lrpcli.engine.layerops import bias_shape, forward, input_vjp
from lrpcli.engine.rules.base import ParamRule


def _spread(call, weight: torch.Tensor, relevance: torch.Tensor, stabilizer, bias_sq=None) -> torch.Tensor:
    x, z, m = call.x, call.output, call.module
    ones = torch.ones((1,) + x.shape[1:], dtype=x.dtype, device=x.device)
    den = forward(m, ones, weight, None, z)
    if bias_sq is not None:
        den = den + bias_sq
    return input_vjp(m, x, weight, relevance / stabilizer(den), z)


class Flat(ParamRule):
    """Uniform over the receptive field."""

    name = "flat"
    reads = ("inputs",)  # the output only for its shape: it need not be kept

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight, _ = call.params()
        return (_spread(call, torch.ones_like(weight), relevance, self.stabilizer),)


class WSquare(ParamRule):
    """Proportional to the squared weights; the squared bias joins the denominator."""

    name = "wsquare"
    reads = ("inputs",)  # the output only for its shape

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight, bias = call.params()
        bias_sq = None
        if bias is not None and not self.zero_bias:
            bias_sq = bias.pow(2).view(bias_shape(call.module, call.output))
        return (_spread(call, weight.pow(2), relevance, self.stabilizer, bias_sq),)
