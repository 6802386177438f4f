"""AlphaBeta: positive and negative contributions normalised separately, alpha - beta = 1."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import ParamRule, check_number, scaled
from .signsplit import SignSplit, total
from .stabilizer import Stabilizer


class AlphaBeta(ParamRule):
    """R_i = sum_j [alpha (x+W+ + x-W-)_ij / s(z+_j) - beta (x+W- + x-W+)_ij / s(z-_j)] R_j.

    z+ = sum_i (x+ W+ + x- W-) + b+ and z- = sum_i (x+ W- + x- W+) + b-: each bias part is counted once.
    """

    name = "alpha_beta"
    shown = ("alpha", "beta")
    ratio_of_output = True

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: Stabilizer | float | None = None,
                 zero_params: Sequence[str] = ()) -> None:
        self.alpha = check_number("AlphaBeta", "alpha", alpha)
        self.beta = check_number("AlphaBeta", "beta", beta)
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(f"AlphaBeta: alpha - beta must be 1, got alpha={self.alpha:g}, beta={self.beta:g}")
        super().__init__(stabilizer, zero_params)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = SignSplit(call, self.zero_bias)
        if self.beta and split.nonnegative_fast:
            return (self._nonnegative(split, relevance),)
        p = split.products()
        pos = scaled(self.stabilizer.divide(relevance, total(p.pp, p.nn, split.bias_pos())), self.alpha)
        neg = None
        if self.beta:
            neg = scaled(self.stabilizer.divide(relevance, total(p.pn, p.np, split.bias_neg())), -self.beta)
        return (split.backproject(pos, neg, neg, pos),)

    def _nonnegative(self, split: SignSplit, relevance: torch.Tensor) -> torch.Tensor:
        """The same rule for x >= 0: z+ = P_pp + b+ from one forward, z- = z - z+, one transposed operation
        through [W+; |W-|] with alpha R / s(z+) and beta R / s(z-) written into one pair buffer."""
        positive = split.positive_sum()
        negative = torch.sub(split.z_rule, positive)
        buf, to_pos, to_neg = split.pair_buffer()
        self.stabilizer.divide(relevance, positive, out=to_pos).mul_(self.alpha)
        del positive
        self.stabilizer.divide(relevance, negative, out=to_neg).mul_(self.beta)
        del negative
        return split.backproject_pair(buf)
