"""Gamma, in its generalised form for signed inputs and outputs.

For outputs z_j >= 0, contributions of the same sign as z_j are scaled by (1 + gamma): x+ with W + gW+, x- with
W + gW-, bias b + g b+. For z_j < 0 the mirror image: x+ with W + gW-, x- with W + gW+, bias b + g b-. For
x >= 0 and z >= 0 this is the classic Gamma rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrpcli.engine.layerops import input_vjp
from lrpcli.engine.rules.base import ParamRule, check_number, times_input, total
from lrpcli.engine.rules.signsplit import SignSplit
from lrpcli.engine.rules.stabilizer import Stabilizer


class Gamma(ParamRule):
    """den_j = z_j + gamma * (same-sign contributions of j, incl. bias part); numerators scaled alike."""

    name = "gamma"
    proportional_to_inputs = True
    shown = ("gamma",)
    ratio_of_output = True
    denominators_take_a_forward = True

    def __init__(self, gamma: float = 0.25, stabilizer: Stabilizer | float | None = None,
                 zero_params: Sequence[str] = ()) -> None:
        self.gamma = check_number("Gamma", "gamma", gamma)
        super().__init__(stabilizer, zero_params)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = SignSplit(call, self.zero_bias)
        if split.positive_outputs_only and self.gamma > 0 and (
                self.stabilizer.mode == "sign" or self.rms_of(call) is not None):
            return (self._positive_outputs(split, relevance),)
        if call.zero_at_nonpositive and split.first_order_nonnegative and self.gamma > 0 and (
                split.bias is not None or split._bias_full is None):
            return (self._positive_whole_output(split, relevance),)
        if split.pair_fast:
            return (self._fused(split, relevance),)
        z = split.z_rule
        positive = z >= 0
        same_sign = torch.where(positive, total(split.aligned, split.bias_pos()),
                                total(split.opposed, split.bias_neg()))
        first_order = not torch.is_grad_enabled()   # then temporaries are updated in place (fewer fresh tensors)
        den = same_sign.mul_(self.gamma).add_(z) if first_order else z + self.gamma * same_sign
        ratio = self.stabilizer.divide(relevance, den, rms=self.rms_of(call))
        boosted = ratio * (1.0 + self.gamma)
        boost_pos = torch.where(positive, boosted, ratio)    # outputs >= 0 boost x+W+ and x-W-
        boost_neg = torch.where(positive, ratio, boosted, out=boosted) if first_order else \
            torch.where(positive, ratio, boosted)            # outputs < 0 boost x+W- and x-W+
        return (split.backproject(boost_pos, boost_neg),)

    def _positive_outputs(self, split: SignSplit, relevance: torch.Tensor) -> torch.Tensor:
        """x >= 0 and relevance only at outputs z > 0 (a layer followed by a ReLU, proportional rules above): the
        classic Gamma rule, R_i = x_i sum_j (W + gamma W+)_ji R_j / (z_j + gamma (P_pp + b+)_j + eps).

        One forward (with eps / gamma folded into its bias) and ONE transposed operation, through W + gamma W+:
        the same convolution work as Epsilon plus one forward. Where z_j <= 0 the relevance is 0 and the
        denominator z_j + gamma s_j >= eps > 0, so the ratio is 0 there, as in the general form. In rms mode
        (the rms of the whole denominator kept in the forward) s(den) = den + eps rms, one pass more.
        """
        z, g = split.z_rule, self.gamma
        folded = self.stabilizer.mode == "sign"
        den = split.positive_sum(self.stabilizer.epsilon / g if folded else 0.0)
        torch.add(z, den, alpha=g, out=den)
        if folded:
            ratio = torch.div(relevance, den, out=den)
        else:
            ratio = self.stabilizer.divide(relevance, den, out=den, nonnegative=True, rms=self.rms_of(split.call))
        weight = split.call.memo("gamma_positive", lambda: torch.add(split.weight, split.weight_pos, alpha=g))
        return times_input(split.x, input_vjp(split.module, split.x, weight, ratio, z), split.call.into)

    def _positive_whole_output(self, split: SignSplit, relevance: torch.Tensor) -> torch.Tensor:
        """``_positive_outputs`` on the whole output z (kept where the rms stabilizer needs it): x >= 0 and the
        relevance 0 wherever z <= 0. The rms takes the whole denominator (``denominators``), which is z + gamma s
        where z >= 0 and (1 + gamma) z - gamma s < 0 where z < 0; there the relevance, and so the ratio, is 0.
        Then one transposed operation through W + gamma W+, as in ``_positive_outputs``."""
        (den,) = self.denominators(split.call, split)
        ratio = self.stabilizer.divide(relevance, den)  # not into den: s(den) is formed from it
        weight = split.call.memo("gamma_positive", lambda: torch.add(split.weight, split.weight_pos, alpha=self.gamma))
        return times_input(split.x, input_vjp(split.module, split.x, weight, ratio, split.z_rule), split.call.into)

    def denominators(self, call, split: SignSplit | None = None) -> tuple[torch.Tensor, ...]:
        """z + gamma times the same-sign sum: the aligned sum plus b+ (s) where z >= 0, z - s where z < 0."""
        split = SignSplit(call, self.zero_bias) if split is None else split
        z = split.z_rule
        s = split.positive_sum() if split.pair_fast else total(split.aligned, split.bias_pos())
        den = torch.where(z >= 0, s, z - s)
        return (torch.add(z, den, alpha=self.gamma, out=den),)

    def _fused(self, split: SignSplit, relevance: torch.Tensor) -> torch.Tensor:
        """The same rule in fewer passes over the output: no torch.where, one transposed operation
        (``split.pair_fast``: x >= 0, or mixed signs stacked along the input channels).

        With s the aligned sum plus b+ (P_pp + b+ for x >= 0), the same-sign sum is s where z >= 0 and z - s (the
        opposed sum plus b-) where z < 0, chosen by a 0/1 mask m through lerp (exact for weights 0 and 1). The
        denominator has the sign of z, so the sign stabilizer is folded into s as a bias shift eps / gamma
        (z + gamma (s + eps/gamma) = den + eps and z + gamma (z - s - eps/gamma) = den - eps). With r = R / s(den),
        for x+ W+ gets r (1 + gamma m) and W- gets r (1 + gamma (1 - m)); regrouped by vector that is
        (W + gamma W-)^T r + gamma |W|^T (r m): one transposed operation through [W + gamma W-; gamma |W|] with r
        and r m in one pair buffer. x- has the roles of W+ and W- swapped: (W + gamma W+)^T r - gamma |W|^T (r m).
        """
        z, g = split.z_rule, self.gamma
        folded = self.stabilizer.mode == "sign" and g > 0
        s = split.positive_sum(self.stabilizer.epsilon / g if folded else 0.0)
        mask = torch.ge(z, 0, out=torch.empty_like(z))  # 1.0 where z >= 0
        den = torch.sub(z, s).lerp_(s, mask)
        del s
        torch.add(z, den, alpha=g, out=den)
        buf, ratio, masked = split.pair_buffer()
        if folded:
            torch.div(relevance, den, out=ratio)
        else:
            self.stabilizer.divide(relevance, den, out=ratio, rms=self.rms_of(split.call))
        del den
        torch.mul(ratio, mask, out=masked)
        return split.backproject_pair(buf, self._fill_weights)

    def _fill_weights(self, first: torch.Tensor, second: torch.Tensor, w_aligned: torch.Tensor, w: torch.Tensor,
                      negative_inputs: bool = False) -> None:
        """[W + gamma W-; gamma |W|] for x+ (w_aligned = W+; W + gamma W- = (1 + gamma) W - gamma W+), and
        [W + gamma W+; -gamma |W|] for x- (w_aligned = W-)."""
        g = self.gamma
        torch.mul(w, 1.0 + g, out=first)
        first.sub_(w_aligned, alpha=g)
        torch.abs(w, out=second)
        second.mul_(-g if negative_inputs else g)
