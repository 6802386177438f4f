"""Gamma, in its generalised form for signed inputs and outputs.

For outputs z_j >= 0, contributions of the same sign as z_j are scaled by (1 + gamma): x+ with W + gW+, x- with
W + gW-, bias b + g b+. For z_j < 0 the mirror image: x+ with W + gW-, x- with W + gW+, bias b + g b-. For
x >= 0 and z >= 0 this is the classic Gamma rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import ParamRule, check_number
from .signsplit import SignSplit, total
from .stabilizer import Stabilizer


class Gamma(ParamRule):
    """den_j = z_j + gamma * (same-sign contributions of j, incl. bias part); numerators scaled alike."""

    name = "gamma"
    shown = ("gamma",)

    def __init__(self, gamma: float = 0.25, stabilizer: Stabilizer | float | None = None,
                 zero_params: Sequence[str] = ()) -> None:
        self.gamma = check_number("Gamma", "gamma", gamma)
        super().__init__(stabilizer, zero_params)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = SignSplit(call, self.zero_bias)
        p = split.products()
        z = split.z_rule
        positive = z >= 0
        same_sign = torch.where(positive, total(p.pp, p.nn, split.bias_pos()), total(p.pn, p.np, split.bias_neg()))
        first_order = not torch.is_grad_enabled()   # then temporaries are updated in place (fewer fresh tensors)
        den = same_sign.mul_(self.gamma).add_(z) if first_order else z + self.gamma * same_sign
        ratio = self.stabilizer.divide(relevance, den)
        boosted = ratio * (1.0 + self.gamma)
        boost_pos = torch.where(positive, boosted, ratio)    # outputs >= 0 boost x+W+ and x-W-
        boost_neg = torch.where(positive, ratio, boosted, out=boosted) if first_order else \
            torch.where(positive, ratio, boosted)            # outputs < 0 boost x+W- and x-W+
        return (split.backproject(boost_pos, boost_neg, boost_neg, boost_pos),)
