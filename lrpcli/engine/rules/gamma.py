"""Gamma, in its generalised form for signed inputs and outputs.

For outputs z_j >= 0, contributions of the same sign as z_j are scaled by (1 + gamma): x+ with W + gW+, x- with
W + gW-, bias b + g b+. For z_j < 0 the mirror image: x+ with W + gW-, x- with W + gW+, bias b + g b-. For
x >= 0 and z >= 0 this is the classic Gamma rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrpcli.engine import layerops as ops
from lrpcli.engine.layerops import forward, input_vjp
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
        if split.any_signs_fast:
            return (self._fused(split, relevance, mixed=True),)
        if split.pair_fast:
            return (self._fused(split, relevance, mixed=split.has_neg),)
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

    def denominators(self, call) -> tuple[torch.Tensor, ...]:
        """z + gamma times the same-sign sum: the aligned sum plus b+ (s) where z >= 0, z - s where z < 0."""
        split = SignSplit(call, self.zero_bias)
        z = split.z_rule
        s = split.positive_sum() if split.pair_fast else total(split.aligned, split.bias_pos())
        den = torch.where(z >= 0, s, z - s)
        return (torch.add(z, den, alpha=self.gamma, out=den),)

    def _fused(self, split: SignSplit, relevance: torch.Tensor, mixed: bool) -> torch.Tensor:
        """The same rule in fewer passes over the output: no torch.where, one forward and transposed work over
        twice the output channels (``split.pair_fast``: x >= 0, or x of both signs on a convolution).

        With W+- = (W +- |W|)/2 and x+- = (x +- |x|)/2, the aligned sum plus b+ is (z + c)/2 and the opposed
        one plus b- is (z - c)/2, where c = f(|x|; |W|, |b|) is one forward on magnitudes. The same-sign sum of
        output j is (z + sigma c)/2 with sigma = +-1 the sign of z, so den = (1 + gamma/2) z + sigma (gamma/2) c,
        which has the sign of z: the sign stabilizer folds into the forward's bias (+ eps). With r = R / s(den),
        x+ takes W^T r + gamma (W+^T (r m) + W-^T (r (1 - m))) (m = 1 where z >= 0) and x- the same with W+ and
        W- swapped, which regroups to x ((1 + gamma/2) W)^T r + |x| ((gamma/2) |W|)^T (sigma r): for x >= 0 one
        transposed operation through the stacked pair, for mixed signs two (``split.backproject_magnitude``).
        Where sigma r = r (x >= 0 and relevance only at outputs z >= 0, as below a ReLU: the ratio is 0 at the
        others), the pair sums to ((1 + gamma/2) W + (gamma/2) |W|)^T r = (W + gamma W+)^T r: one operation.

        ``mixed``: x may have both signs (x >= 0 is not known, and no pass looks: the form holds for any x).
        sigma is copysign(1, z): -1 for z = -0.0, where the general path takes +1; such an output is a sum of
        zero products (and a zero bias), whose numerators are zero whichever sign its denominator gets.
        """
        z, g = split.z_rule, self.gamma
        call = split.call
        folded = self.stabilizer.mode == "sign"
        shift = self.stabilizer.epsilon if folded else 0.0
        half_abs = call.memo("gamma_half_abs", lambda: split.weight.abs().mul_(0.5 * g))
        bias = None
        if split.bias is not None or shift:
            bias = call.memo(f"gamma_half_abs_bias_{shift!r}", lambda: self._magnitude_bias(split, shift))
        # a stacked pair for x >= 0 on a layer without groups; with groups two transposed operations over the
        # layer's own groups run faster than one over twice as many (the CPU backends' depthwise kernels)
        stacks = not mixed and ops.pairable(split.module)
        buf, ratio, signed = split.pair_buffer() if stacks else (None, *split.output_buffers(2))
        # relevance only where z > 0 (a ReLU above) and z is the rule's output (bias kept): sigma r = r wherever
        # r is not 0, and one transposed operation follows
        positive = not mixed and call.positive_relevance and z is split.z
        den = forward(split.module, split.x_abs, half_abs, bias, split.z)
        if positive:
            # |den| = c + (1 + gamma/2) |z|, no sign needed: where z > 0 it is den, the other outputs carry no
            # relevance (their ratio is 0 over any positive number), and its rms is den's
            den.add_(torch.abs(z, out=signed), alpha=1.0 + 0.5 * g)
        else:  # copysign is a slow kernel on the CPU: sigma once, then products
            sigma = torch.copysign(torch.ones((), dtype=z.dtype, device=z.device), z, out=signed)
            den.mul_(sigma).add_(z, alpha=1.0 + 0.5 * g)
        if folded:  # eps is in c already
            torch.div(relevance, den, out=ratio)
        elif self.stabilizer.mode == "rms":  # den has the sign sigma (or is |den|): s(den) = den + sigma eps rms
            rms = self.rms_of(call)
            term = Stabilizer.rms(den, self.stabilizer.epsilon) if rms is None else rms * self.stabilizer.epsilon
            s = torch.add(den, term, out=ratio) if positive else torch.addcmul(den, sigma, term, out=ratio)
            torch.div(relevance, s, out=ratio)
        else:
            self.stabilizer.divide(relevance, den, out=ratio, nonnegative=positive, rms=self.rms_of(call))
        del den
        if not positive:
            signed.mul_(ratio)  # sigma r
        scaled = call.memo("gamma_scaled", lambda: split.weight * (1.0 + 0.5 * g))
        if mixed:
            return split.backproject_magnitude(scaled, ratio, half_abs, signed)
        # relevance only where z >= 0 (a ReLU above): one operation through W + gamma W+, known or found (a capture
        # reads no values)
        if positive or not ops.tracing() and torch.equal(signed, ratio):
            weight = call.memo("gamma_positive", lambda: torch.add(split.weight, split.weight_pos, alpha=g))
            return times_input(split.x, input_vjp(split.module, split.x, weight, ratio, split.z), call.into)
        if not stacks:
            both = input_vjp(split.module, split.x, scaled, ratio, split.z).add_(
                input_vjp(split.module, split.x, half_abs, signed, split.z))
            return times_input(split.x, both, call.into)
        stacked = call.memo("gamma_stacked", lambda: ops.stack_pair(split.module, scaled, half_abs))
        return times_input(split.x, ops.pair_vjp(split.module, split.x, stacked, buf, split.z), call.into)

    def _magnitude_bias(self, split: SignSplit, shift: float) -> torch.Tensor:
        """(gamma/2) |b| + shift per output channel (shift alone under zero_params=['bias'])."""
        channels = split.weight.shape[ops.weight_out_dim(split.module)]
        bias = split.x.new_full((channels,), shift) if split.bias is None else \
            split.bias.flatten().abs().mul_(0.5 * self.gamma).add_(shift)
        return bias
