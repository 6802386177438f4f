"""AlphaBeta: positive and negative contributions normalised separately, alpha - beta = 1."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrpcli.engine.rules.base import ParamRule, check_number, scaled, total
from lrpcli.engine.rules.signsplit import SignSplit
from lrpcli.engine.rules.stabilizer import Stabilizer


class AlphaBeta(ParamRule):
    """R_i = sum_j [alpha (x+W+ + x-W-)_ij / s(z+_j) - beta (x+W- + x-W+)_ij / s(z-_j)] R_j.

    z+ = sum_i (x+ W+ + x- W-) + b+ and z- = sum_i (x+ W- + x- W+) + b-: each bias part is counted once.
    """

    name = "alpha_beta"
    proportional_to_inputs = True
    shown = ("alpha", "beta")
    ratio_of_output = True
    denominators_take_a_forward = True

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: Stabilizer | float | None = None,
                 zero_params: Sequence[str] = ()) -> None:
        self.alpha = check_number("AlphaBeta", "alpha", alpha)
        self.beta = check_number("AlphaBeta", "beta", beta)
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(f"AlphaBeta: alpha - beta must be 1, got alpha={self.alpha:g}, beta={self.beta:g}")
        super().__init__(stabilizer, zero_params)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = SignSplit(call, self.zero_bias)
        if self.beta and split.any_signs_fast and relevance.dtype != torch.float64:
            return (self._magnitude(split, relevance),)
        if self.beta and split.pair_fast:
            return (self._fused(split, relevance),)
        pos = scaled(self.stabilizer.divide(relevance, total(split.aligned, split.bias_pos()),
                                            rms=self.rms_of(call)), self.alpha)
        neg = None
        if self.beta:
            neg = scaled(self.stabilizer.divide(relevance, total(split.opposed, split.bias_neg()),
                                                rms=self.rms_of(call, 1)), -self.beta)
        return (split.backproject(pos, neg),)

    def denominators(self, call) -> tuple[torch.Tensor, ...]:
        """z+ and z- = z - z+ (the opposed sum plus b-)."""
        split = SignSplit(call, self.zero_bias)
        positive = split.positive_sum() if split.pair_fast else total(split.aligned, split.bias_pos())
        return positive, torch.sub(split.z_rule, positive)

    def _fused(self, split: SignSplit, relevance: torch.Tensor) -> torch.Tensor:
        """The same rule in three passes over the output besides the two convolutions (``split.pair_fast``).

        z+ (the aligned sum plus b+) comes from one forward and z- = z - z+. Their signs are known (z+ >= 0 >= z-),
        so the sign stabilizer is folded into the forward's bias: s(z+) = P_pp + b+ + eps and s(z-) = z - that.
        alpha and beta are folded into the stacked weights [alpha W+; beta |W-|], which get R / s(z+) and
        R / s(z-).
        """
        buf, to_pos, to_neg = split.pair_buffer()
        self._ratios(split, relevance, split.positive_sum, to_pos, to_neg)
        return split.backproject_pair(buf, self._fill_weights)

    def _ratios(self, split: SignSplit, relevance: torch.Tensor, positive_sum, to_pos: torch.Tensor,
                to_neg: torch.Tensor) -> None:
        """R / s(z+) into ``to_pos`` and R / s(z-) into ``to_neg``, z+ from ``positive_sum(shift)`` (one forward)
        and z- = z - z+; the sign stabilizer folded into that forward's bias (z+ >= 0 >= z-)."""
        folded = self.stabilizer.mode == "sign"
        positive = positive_sum(self.stabilizer.epsilon if folded else 0.0)
        if folded:
            torch.div(relevance, torch.sub(split.z_rule, positive, out=to_neg), out=to_neg)
            torch.div(relevance, positive, out=to_pos)
        else:
            self.stabilizer.divide(relevance, torch.sub(split.z_rule, positive), out=to_neg,
                                   rms=self.rms_of(split.call, 1))
            self.stabilizer.divide(relevance, positive, out=to_pos, rms=self.rms_of(split.call))

    def _magnitude(self, split: SignSplit, relevance: torch.Tensor) -> torch.Tensor:
        """The same rule for x of any sign on a convolution (``split.any_signs_fast``), without a pass that finds
        the signs. With x+- = (x +- |x|)/2 and W+- = (W +- |W|)/2, the numerators x+ (alpha W+^T a - beta W-^T b) +
        x- (alpha W-^T a - beta W+^T b), a = R / s(z+) and b = R / s(z-), regroup to
        x (alpha/2 W)^T (a - k b) + |x| (alpha/2 |W|)^T (a + k b) with k = beta / alpha: two transposed operations
        over the output channels, where the sign parts through a block weight take four. z+ comes from one forward
        on |x| (``positive_sum_by_magnitude``), as in ``_fused``.

        The x and |x| parts cancel where x < 0 (for x > 0 the W- parts do), so the result carries a rounding error
        a few times the block form's: about 3e-14 of the relevance in float64 where the block form keeps 1e-14.
        float64, the dtype of exact comparisons, therefore keeps the block form; in float32 and below the
        difference is far below the dtype's own rounding."""
        to_pos, to_neg = split.output_buffers(2)
        self._ratios(split, relevance, split.positive_sum_by_magnitude, to_pos, to_neg)
        k = self.beta / self.alpha
        to_x = torch.add(to_pos, to_neg, alpha=-k)
        to_abs = torch.add(to_pos, to_neg, alpha=k, out=to_neg)
        half = 0.5 * self.alpha
        first = split.call.memo("alpha_beta_half", lambda: split.weight * half)
        second = split.call.memo("alpha_beta_half_abs", lambda: split.weight.abs().mul_(half))
        return split.backproject_magnitude(first, to_x, second, to_abs)

    def _fill_weights(self, first: torch.Tensor, second: torch.Tensor, w_aligned: torch.Tensor, w: torch.Tensor,
                      negative_inputs: bool = False) -> None:
        """[alpha W+; beta |W-|] for x+ (w_aligned = W+; |W-| = W+ - W), and [alpha W-; -beta W+] for x-
        (w_aligned = W-; the same expressions)."""
        torch.mul(w_aligned, self.alpha, out=first)
        torch.sub(w_aligned, w, out=second)
        if self.beta != 1.0:
            second.mul_(self.beta)
