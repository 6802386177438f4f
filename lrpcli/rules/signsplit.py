"""The sign decomposition shared by ZPlus, AlphaBeta and Gamma.

With x = x+ + x- and W = W+ + W-, the layer output splits into four products
P_pp = f(x+; W+), P_pn = f(x+; W-), P_np = f(x-; W+), P_nn = f(x-; W-), which sum to z - b. Every rule of this
family has denominators that are sums of these products (plus parts of the bias) and numerators
x+ (W+^T G_pp + W-^T G_pn) + x- (W+^T G_np + W-^T G_nn) for per-output vectors G. Because f is linear in W,
only products with W+ need an extra forward: the W- ones follow by subtraction from the stored output. For
inputs that are all non-negative (anything after a ReLU) that is one extra forward and at most two
transposed operations per layer.
"""

from __future__ import annotations

import torch

from ..layerops import bias_shape, forward, input_vjp


class SignSplit:
    """Products and back-projection of one layer call, computing only what the inputs' signs require."""

    def __init__(self, call, zero_bias: bool) -> None:
        self.call = call
        self.module = call.module
        self.x = call.x
        self.weight, bias = call.params()
        self.weight_pos = self.weight.clamp(min=0)
        self.z = call.output
        self._bias_full = None if bias is None else bias.view(bias_shape(self.module, self.z))
        self.bias = None if zero_bias else self._bias_full
        low, high = torch.aminmax(self.x.detach())   # one pass for both signs
        low, high = torch.stack([low, high]).tolist()
        self.has_pos, self.has_neg = high > 0, low < 0
        self.x_pos = self.x.clamp(min=0) if self.has_neg else self.x
        self.x_neg = self.x.clamp(max=0) if self.has_neg else None

    # outputs ------------------------------------------------------------------------------------------------
    @property
    def z_nobias(self) -> torch.Tensor:
        """z - b from the stored output (no re-run)."""
        return self.z if self._bias_full is None else self.z - self._bias_full

    @property
    def z_rule(self) -> torch.Tensor:
        """The output the rule sees: z, or z without bias under zero_params=['bias']."""
        return self.z if self.bias is not None or self._bias_full is None else self.z_nobias

    def bias_pos(self) -> torch.Tensor | None:
        return self.bias.clamp(min=0) if self.bias is not None else None

    def bias_neg(self) -> torch.Tensor | None:
        return self.bias.clamp(max=0) if self.bias is not None else None

    def products(self) -> tuple[torch.Tensor | None, ...]:
        """(P_pp, P_pn, P_np, P_nn) with the fewest forwards: one when x has a single sign, two else.

        Products that are zero because x has no entries of that sign are None.
        """
        f, m, z = forward, self.module, self.z
        if not self.has_neg:
            pp = f(m, self.x_pos, self.weight_pos, None, z)
            return pp, self.z_nobias - pp, None, None
        if not self.has_pos:
            np_ = f(m, self.x_neg, self.weight_pos, None, z)
            return None, None, np_, self.z_nobias - np_
        both = f(m, torch.cat([self.x_pos, self.x_neg]), self.weight_pos, None, z)
        pp, np_ = both.chunk(2)
        nn_ = f(m, self.x_neg, self.weight - self.weight_pos, None, z)
        return pp, self.z_nobias - pp - np_ - nn_, np_, nn_


    # back-projection ------------------------------------------------------------------------------------------
    def backproject(self, g_pp, g_pn, g_np, g_nn) -> torch.Tensor:
        """x+ (W+^T g_pp + W-^T g_pn) + x- (W+^T g_np + W-^T g_nn); None entries count as zero.

        W+ and W- are applied separately (not W and W+, which would save nothing here): where a denominator
        is zero its huge ratio then meets exact zeros instead of cancelling against itself. Vectors for the
        same weight are stacked into one call.
        """
        weight_neg = self.weight - self.weight_pos
        jobs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # (weight, vector, input part)
        if self.has_pos:
            jobs += [(self.weight_pos, g_pp, self.x_pos), (weight_neg, g_pn, self.x_pos)]
        if self.has_neg:
            jobs += [(self.weight_pos, g_np, self.x_neg), (weight_neg, g_nn, self.x_neg)]
        result = None
        for weight in (self.weight_pos, weight_neg):
            mine = [(v, part) for w, v, part in jobs if w is weight and v is not None]
            if not mine:
                continue
            vjps = input_vjp(self.module, self.x, weight, torch.cat([v for v, _ in mine]), self.z)
            for (_, part), vjp in zip(mine, vjps.chunk(len(mine))):
                term = part * vjp
                result = term if result is None else result + term
        return result if result is not None else torch.zeros_like(self.x)


def total(*terms: torch.Tensor | None) -> torch.Tensor:
    """The sum of the terms that are not None (at least one must be a tensor)."""
    present = [t for t in terms if t is not None]
    result = present[0]
    for t in present[1:]:
        result = result + t
    return result
