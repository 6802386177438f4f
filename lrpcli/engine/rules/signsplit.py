"""The sign decomposition shared by ZPlus, AlphaBeta and Gamma.

With x = x+ + x- and W = W+ + W-, the layer output splits into four products
P_pp = f(x+; W+), P_pn = f(x+; W-), P_np = f(x-; W+), P_nn = f(x-; W-), which sum to z - b. The rules of this
family only ever need two sums of them: the aligned contributions P_pp + P_nn (x and W of the same sign, each
>= 0) and the opposed ones P_pn + P_np (each <= 0), plus parts of the bias; and their numerators are
x+ (W+^T a + W-^T c) + x- (W-^T a + W+^T c) for two per-output vectors a (aligned) and c (opposed). Because f is
linear in W, the aligned sum takes one extra forward and the opposed one follows by subtraction from the stored
output. For inputs that are all non-negative (anything after a ReLU) that is one forward through W+ and one
transposed operation per layer; for mixed signs (a first layer) the two sign parts are stacked along the input
channels, again one forward and one transposed operation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from lrpcli.engine import layerops as ops
from lrpcli.engine.layerops import bias_shape, channel_dim, forward, input_vjp, pairable, tracing
from lrpcli.engine.rules.base import fits, times_input


class SignSplit:
    """Products and back-projection of one layer call, computing only what the inputs' signs require."""

    def __init__(self, call, zero_bias: bool) -> None:
        self.call = call
        self.module = call.module
        self.x = call.x
        self.weight, bias = call.params()
        self.z = call.output
        self._bias = bias
        self._bias_full = None if bias is None else bias.view(bias_shape(self.module, self.z))
        self.bias = None if zero_bias else self._bias_full

    @functools.cached_property
    def _signs(self) -> tuple[bool, bool]:
        """(x has values > 0, x has values < 0), read when a path first asks (``has_pos``, ``has_neg``)."""
        if self.call.input_nonnegative:  # a ReLU's output: no pass over x (has_pos may be True for an all-zero x)
            return True, False
        if tracing():  # a captured graph serves any input: both signs, no pass that reads values
            return True, True
        low, high = torch.aminmax(self.x.detach())   # one pass for both signs
        low, high = torch.stack([low, high]).tolist()
        return high > 0, low < 0

    @property
    def has_pos(self) -> bool:
        return self._signs[0]

    @property
    def has_neg(self) -> bool:
        return self._signs[1]

    @functools.cached_property
    def x_stacked(self) -> torch.Tensor | None:
        """[x+, x-] along the input channels, for mixed signs on a ``pairable`` layer (else None), formed when a
        path first needs it; x+ and x- are then its halves, written straight into it when no graph is
        recorded."""
        if not self._stacks_inputs:
            return None
        channels = channel_dim(self.module)
        if torch.is_grad_enabled():
            return torch.cat([self.x.clamp(min=0), self.x.clamp(max=0)], dim=channels)
        shape = list(self.x.shape)
        shape[channels] *= 2
        stacked = ops.empty_like_layout(self.x, shape)
        pos, neg = stacked.chunk(2, dim=channels)
        torch.clamp(self.x, min=0, out=pos)
        torch.clamp(self.x, max=0, out=neg)
        return stacked

    @functools.cached_property
    def x_pos(self) -> torch.Tensor:
        """x+ (x itself for x >= 0): a half of ``x_stacked`` where that exists."""
        if self.x_stacked is not None:
            return self.x_stacked.chunk(2, dim=channel_dim(self.module))[0]
        return self.x.clamp(min=0) if self.has_neg else self.x

    @functools.cached_property
    def x_neg(self) -> torch.Tensor | None:
        """x- (None for x >= 0): a half of ``x_stacked`` where that was formed already, else its own pass."""
        if "x_stacked" in self.__dict__ and self.x_stacked is not None:
            return self.x_stacked.chunk(2, dim=channel_dim(self.module))[1]
        return self.x.clamp(max=0) if self.has_neg else None

    @functools.cached_property
    def weight_pos(self) -> torch.Tensor:
        """W+, formed when first used (ZPlus on a large dense layer forms it block by block instead), once for all
        batch slices of the call."""
        return self.call.memo("weight_pos", lambda: self.weight.clamp(min=0))

    # outputs ------------------------------------------------------------------------------------------------
    @property
    def z_nobias(self) -> torch.Tensor:
        """z - b from the stored output (no re-run)."""
        return self.call.output_without_bias(self._bias)

    @property
    def z_rule(self) -> torch.Tensor:
        """The output the rule sees: z, or z without bias under zero_params=['bias']."""
        return self.z if self.bias is not None or self._bias_full is None else self.z_nobias

    def bias_pos(self) -> torch.Tensor | None:
        return self.bias.clamp(min=0) if self.bias is not None else None

    def bias_neg(self) -> torch.Tensor | None:
        return self.bias.clamp(max=0) if self.bias is not None else None

    @functools.cached_property
    def aligned(self) -> torch.Tensor:
        """P_pp + P_nn: the contributions where x and W have the same sign (each >= 0), without bias.

        One forward: through W+ for x >= 0, through W- for x <= 0, and for mixed signs on a ``pairable`` layer
        through [W+, W-] on [x+, x-] stacked along the input channels (a 3-channel first layer then runs one
        6-channel convolution instead of two 3-channel ones)."""
        sp, m = self, self.module
        if not sp.has_neg:
            return forward(m, sp.x, sp.weight_pos, None, sp.z)
        if not sp.has_pos:
            return forward(m, sp.x, sp.weight_neg, None, sp.z)
        if self._stacks_inputs:
            return forward(m, sp.x_stacked, self._aligned_weights, None, sp.z)
        return forward(m, sp.x_pos, sp.weight_pos, None, sp.z) + forward(m, sp.x_neg, sp.weight_neg, None, sp.z)

    @property
    def _aligned_weights(self) -> torch.Tensor:
        """[W+, W-] along the input channels: the aligned products of [x+, x-] in one forward."""
        dim = ops.weight_in_dim(self.module)
        return self.call.memo("aligned", lambda: torch.cat([self.weight_pos, self.weight_neg], dim=dim))

    @functools.cached_property
    def opposed(self) -> torch.Tensor:
        """P_pn + P_np: the contributions where x and W have opposite signs (each <= 0), without bias; by
        subtraction from the stored output (z - b - aligned), one more forward where the output was not kept."""
        if not self.z.is_meta:
            return self.z_nobias - self.aligned
        sp, m = self, self.module
        if not sp.has_neg:
            return forward(m, sp.x, sp.weight_neg, None, sp.z)
        if not sp.has_pos:
            return forward(m, sp.x, sp.weight_pos, None, sp.z)
        return forward(m, sp.x_pos, sp.weight_neg, None, sp.z) + forward(m, sp.x_neg, sp.weight_pos, None, sp.z)

    @functools.cached_property
    def weight_neg(self) -> torch.Tensor:
        """W- = W - W+, formed only where a job needs it (a first dense layer's W- is as large as W)."""
        return self.call.memo("weight_neg", lambda: self.weight - self.weight_pos)

    @property
    def _stacks_inputs(self) -> bool:
        """Mixed-sign x on a layer whose two sign parts can share one call stacked along the input channels."""
        return self.has_pos and self.has_neg and pairable(self.module)

    # the non-negative fast path ---------------------------------------------------------------------------------
    @property
    def first_order_nonnegative(self) -> bool:
        """x >= 0 (after a ReLU) and no graph being recorded: what every fast path of this family requires."""
        return not self.has_neg and not torch.is_grad_enabled()

    @property
    def pair_fast(self) -> bool:
        """True for the cases the fused path serves: first order, a convolution, and x >= 0 (after a ReLU) or x of
        both signs (without groups: stacked along the input channels; with groups, depthwise included: each sign
        part on its own, ``ops.pair_vjp``). Rules then need one forward of the aligned sum (``positive_sum``) and
        one transposed operation through stacked weights (``backproject_pair``; two for grouped mixed signs)."""
        return (not torch.is_grad_enabled()
                and (self._stacks_inputs or ops.pairable_outputs(self.module) and (self.has_pos or not self.has_neg)))

    @property
    def _grouped_mixed(self) -> bool:
        """x of both signs on a grouped convolution (``pair_fast``): x+ and x- go through separate calls."""
        return self.has_pos and self.has_neg and not self._stacks_inputs

    @property
    def positive_outputs_only(self) -> bool:
        """x >= 0, first order, and relevance only at outputs > 0 (``LayerCall.output_rectified``) with the bias
        as in the layer: then only the rules' branch for outputs > 0 matters."""
        return (self.call.output_rectified and self.first_order_nonnegative
                and (self.bias is not None or self._bias_full is None))

    @property
    def any_signs_fast(self) -> bool:
        """First order, x not known to be >= 0, on a layer ``pair_fast`` serves with x of both signs: for rules
        whose fused form holds for inputs of any sign (through |x|), which then skip the pass that finds the
        signs."""
        return (not torch.is_grad_enabled() and not self.call.input_nonnegative
                and ops.pairable_outputs(self.module))

    def positive_sum(self, shift: float = 0.0) -> torch.Tensor:
        """The aligned sum plus b+ (+ shift) in one forward, the bias added by the convolution itself; a fresh
        tensor: P_pp + b+ for x >= 0, P_pp + P_nn + b+ for mixed signs (``pair_fast``).

        It is the sum of the outputs' positive contributions; its complement, z - it, is the opposed sum plus b-,
        the negative one. ``shift`` lets a rule fold a constant into the same pass (the stabilizer).

        For mixed signs the forward runs on |x| with |W|: f(|x|; |W|) = aligned - opposed and z - b = aligned +
        opposed, so the aligned sum plus b+ is (z + f(|x|; |W|, |b|))/2 (2 b+ - b = |b|): one convolution over
        the input channels instead of one over twice as many (or two, with groups)."""
        if self.has_pos and self.has_neg and not self.z.is_meta:
            return self.positive_sum_by_magnitude(shift)
        bias = self.bias.clamp(min=0).flatten() if self.bias is not None else None
        if shift:
            channels = self.weight_pos.shape[ops.weight_out_dim(self.module)]
            bias = bias + shift if bias is not None else self.x.new_full((channels,), shift)
        if self.x_stacked is not None:
            return forward(self.module, self.x_stacked, self._aligned_weights, bias, self.z)
        if self._grouped_mixed:
            return forward(self.module, self.x_pos, self.weight_pos, bias, self.z).add_(
                forward(self.module, self.x_neg, self.weight_neg, None, self.z))
        return forward(self.module, self.x, self.weight_pos, bias, self.z)

    def positive_sum_by_magnitude(self, shift: float) -> torch.Tensor:
        """(z + f(|x|; |W|, |b| + 2 shift)) / 2, the aligned sum plus b+ (+ shift) for x of any sign
        (``positive_sum``); z is the rule's output (z without b under zero_params=['bias'], then without |b| too)."""
        m = self.module
        bias = None
        if self.bias is not None or shift:
            def magnitude_bias() -> torch.Tensor:
                channels = self.weight.shape[ops.weight_out_dim(m)]
                full = self._bias.abs() if self.bias is not None else self.x.new_zeros((channels,))
                return full.flatten() + 2.0 * shift if shift else full.flatten()
            bias = self.call.memo(f"magnitude_bias_{shift!r}", magnitude_bias)
        weight = self.call.memo("weight_abs", lambda: self.weight.abs())
        s = forward(m, self.x_abs, weight, bias, self.z)
        if torch.is_grad_enabled():
            return (s + self.z_rule) * 0.5
        return s.add_(self.z_rule).mul_(0.5)

    def pair_buffer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An uninitialised buffer shaped like z with twice the channels, and its two halves (a, b) for
        ``backproject_pair``: rules write their two per-output vectors straight into it."""
        z, dim = self.z, channel_dim(self.module)
        shape = list(z.shape)
        shape[dim] *= 2
        buf = ops.empty_like_layout(z, shape, device=self.x.device)  # z may be a meta stand-in
        a, b = buf.chunk(2, dim=dim)
        return buf, a, b

    def output_buffers(self, count: int) -> list[torch.Tensor]:
        """``count`` uninitialised tensors shaped like z, in its layout, on x's device (z may be a meta
        stand-in)."""
        return [ops.empty_like_layout(self.z, self.z.shape, device=self.x.device) for _ in range(count)]

    def backproject_pair(self, buf: torch.Tensor,
                         fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool], None]
                         ) -> torch.Tensor:
        """x (A^T a + B^T b) for x >= 0, with a and b the halves of ``buf``: one transposed operation through the
        stacked [A; B]. ``fill(A, B, W+, W, False)`` writes the two weights into the halves of one stacked buffer
        (rules fold their constant factors into the weights, which costs a pass over the weights instead of one
        over the output; built once per call, with no intermediate weight-sized tensors).

        For mixed signs, x- meets the weights with the roles of W+ and W- swapped (W- gives its aligned
        contributions): x+ (A^T a + B^T b) + x- (A'^T a + B'^T b) with ``fill(A', B', W-, W, True)``. The block
        weight [[A, A'], [B, B']] over [x+, x-] makes that one transposed operation too."""
        m = self.module
        if self.x_stacked is None:
            def build(negative: bool = False) -> torch.Tensor:
                stacked, first, second = ops.pair_of_weights(m, self.weight)
                fill(first, second, self.weight_neg if negative else self.weight_pos, self.weight, negative)
                return stacked

            vjp = ops.pair_vjp(m, self.x, self.call.memo("stacked", build), buf, self.z)
            if not self._grouped_mixed:
                return times_input(self.x, vjp, self.call.into)
            # grouped, both signs: [A; B] for x+ and [A'; B'] for x-, one transposed operation each
            to_neg = ops.pair_vjp(m, self.x, self.call.memo("stacked_neg", lambda: build(True)), buf, self.z)
            return times_input(self.x_pos, vjp, self.call.into).addcmul_(to_neg, self.x_neg)

        def build_block() -> torch.Tensor:
            shape = list(self.weight.shape)
            shape[ops.weight_in_dim(m)] *= 2
            shape[ops.weight_out_dim(m)] *= 2
            block = self.weight.new_empty(shape)
            halves = block.chunk(2, dim=ops.weight_in_dim(m))
            for half, w_aligned, negative in zip(halves, (self.weight_pos, self.weight_neg), (False, True)):
                first, second = half.chunk(2, dim=ops.weight_out_dim(m))
                fill(first, second, w_aligned, self.weight, negative)
            return block

        vjp = input_vjp(m, self.x_stacked, self.call.memo("block", build_block), buf, self.z)
        to_pos, to_neg = vjp.chunk(2, dim=channel_dim(m))
        # a fresh result where there is no ``into``: to_pos * x+ in place would return a view of the doubled vjp
        into = self.call.into
        result = torch.mul(to_pos, self.x_pos, out=into) if fits(into, to_pos) else to_pos * self.x_pos
        return result.addcmul_(to_neg, self.x_neg)

    @functools.cached_property
    def x_abs(self) -> torch.Tensor:
        """|x| (x itself for x known to be >= 0), formed once for the forward on magnitudes and the back-projection that
        follows it."""
        return self.x if self.call.input_nonnegative else self.x.abs()

    def backproject_magnitude(self, first: torch.Tensor, a: torch.Tensor, second: torch.Tensor,
                              b: torch.Tensor) -> torch.Tensor:
        """x (A^T a) + |x| (B^T b) for weights A = ``first``, B = ``second``: two transposed operations over
        the output channels (``pair_fast`` layers; a fresh result or the call's ``into``).

        With W+ = (W + |W|)/2 and W- = (W - |W|)/2, a rule whose x+ part is W^T u + W+^T p + W-^T q and whose
        x- part swaps W+ and W- is x+ (c W^T r + d |W|^T t) + x- (c W^T r - d |W|^T t) = x (c W^T r) + |x| (d
        |W|^T t): two layer's worth of transposed work for x of both signs, where the sign parts through a
        block weight over [x+, x-] take 4."""
        m = self.module
        to_x = input_vjp(m, self.x, first, a, self.z)
        to_abs = input_vjp(m, self.x, second, b, self.z)
        return times_input(self.x, to_x, self.call.into).addcmul_(to_abs, self.x_abs)

    # back-projection ------------------------------------------------------------------------------------------
    def backproject(self, same: torch.Tensor, opposite: torch.Tensor | None) -> torch.Tensor:
        """x+ (W+^T same + W-^T opposite) + x- (W-^T same + W+^T opposite): ``same`` goes back through the
        contributions of aligned signs (the denominators of ``aligned``), ``opposite`` through the others;
        None counts as zero.

        W+ and W- are applied separately (not W and W+, which would save nothing here): where a denominator is
        zero its huge ratio then meets exact zeros instead of cancelling against itself. For mixed-sign x on a
        ``pairable`` layer everything is one transposed operation: [same; opposite] through the block weights
        [[W+, W-]; [W-, W+]] gives both input-channel halves (for x+ and for x-) at once.
        """
        m = self.module
        if self._stacks_inputs:
            if opposite is None:
                vector, for_pos, for_neg = same, self.weight_pos, self.weight_neg
            else:  # [W+; W-] and [W-; W+] along the output channels, for [same; opposite]
                vector = torch.cat([same, opposite], dim=channel_dim(m))
                for_pos, for_neg = self.call.memo("signed_pair", lambda: (
                    ops.stack_pair(m, self.weight_pos, self.weight_neg),
                    ops.stack_pair(m, self.weight_neg, self.weight_pos)))
            # input_vjps stacks the two along the input channels: [[W+, W-]; [W-, W+]], one transposed operation
            to_pos, to_neg = ops.input_vjps(m, self.x, for_pos, for_neg, vector, self.z)
            return times_input(self.x_pos, to_pos) + times_input(self.x_neg, to_neg)
        jobs: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []  # (weight, vector, input part)
        if self.has_pos:
            jobs += [("pos", same, self.x_pos), ("neg", opposite, self.x_pos)]
        if self.has_neg:
            jobs += [("neg", same, self.x_neg), ("pos", opposite, self.x_neg)]
        result = None
        for sign in ("pos", "neg"):
            mine = [(v, part) for w, v, part in jobs if w == sign and v is not None]
            if not mine:
                continue
            weight = self.weight_pos if sign == "pos" else self.weight_neg
            stacked = mine[0][0] if len(mine) == 1 else torch.cat([v for v, _ in mine])  # along the batch
            vjps = input_vjp(m, self.x, weight, stacked, self.z)
            # split by sizes (not chunk): the same views, and a captured batch size needs no guard on them
            for (_, part), vjp in zip(mine, vjps.split([v.shape[0] for v, _ in mine])):
                term = times_input(part, vjp, self.call.into if result is None else None)
                result = term if result is None else (result + term if torch.is_grad_enabled() else result.add_(term))
        return result if result is not None else torch.zeros_like(self.x)

