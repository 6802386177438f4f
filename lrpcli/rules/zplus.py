"""ZPlus: only positive contributions, generalised to signed inputs (x+ with W+, x- with W-, bias b+)."""

from __future__ import annotations

import torch

from .base import ParamRule
from .signsplit import SignSplit, total


class ZPlus(ParamRule):
    """R_i = sum_j (x+_i W+_ji + x-_i W-_ji) R_j / s(sum_i (x+ W+ + x- W-) + b+_j)."""

    name = "zplus"
    reads = ("inputs",)  # the denominator is built from products alone: the output need not be kept

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = SignSplit(call, self.zero_bias)
        p = split.products()
        ratio = self.stabilizer.divide(relevance, total(p.pp, p.nn, split.bias_pos()))
        return (split.backproject(ratio, None, None, ratio),)
