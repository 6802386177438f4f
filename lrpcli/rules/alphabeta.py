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

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: Stabilizer | float | None = None,
                 zero_params: Sequence[str] = ()) -> None:
        self.alpha = check_number("AlphaBeta", "alpha", alpha)
        self.beta = check_number("AlphaBeta", "beta", beta)
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(f"AlphaBeta: alpha - beta must be 1, got alpha={self.alpha:g}, beta={self.beta:g}")
        super().__init__(stabilizer, zero_params)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = SignSplit(call, self.zero_bias)
        p = split.products()
        pos = scaled(self.stabilizer.divide(relevance, total(p.pp, p.nn, split.bias_pos())), self.alpha)
        neg = None
        if self.beta:
            neg = scaled(self.stabilizer.divide(relevance, total(p.pn, p.np, split.bias_neg())), -self.beta)
        return (split.backproject(pos, neg, neg, pos),)
