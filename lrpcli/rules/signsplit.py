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

import functools
from collections.abc import Callable

import torch

from ..layerops import CONV_TRANSPOSE_TYPES, bias_shape, channel_dim, forward, input_vjp, pairable, stack_pair
from .base import times_input


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
        low, high = torch.aminmax(self.x.detach())   # one pass for both signs
        low, high = torch.stack([low, high]).tolist()
        self.has_pos, self.has_neg = high > 0, low < 0
        self.x_pos = self.x.clamp(min=0) if self.has_neg else self.x
        self.x_neg = self.x.clamp(max=0) if self.has_neg else None

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

    def products(self) -> Products:
        """P_pp, P_pn, P_np, P_nn, each computed when first used, with the fewest forwards: one when x has a
        single sign, two else. Products that are zero because x has no entries of that sign are None."""
        return Products(self)

    # the non-negative fast path ---------------------------------------------------------------------------------
    @property
    def first_order_nonnegative(self) -> bool:
        """x >= 0 (after a ReLU) and no graph being recorded: what every fast path of this family requires."""
        return not self.has_neg and not torch.is_grad_enabled()

    @property
    def nonnegative_fast(self) -> bool:
        """True for the common case the fused path serves: x >= 0, first order, a convolution without groups.
        Rules then need one forward P_pp (+ b+) and one transposed operation through stacked weights."""
        return self.first_order_nonnegative and pairable(self.module)

    @property
    def positive_outputs_only(self) -> bool:
        """x >= 0, first order, and relevance only at outputs > 0 (``LayerCall.output_rectified``) with the bias
        as in the layer: then only the rules' branch for outputs > 0 matters."""
        return (self.first_order_nonnegative and self.call.output_rectified
                and (self.bias is not None or self._bias_full is None))

    def positive_sum(self, shift: float = 0.0) -> torch.Tensor:
        """P_pp + b+ (+ shift) in one forward, the bias added by the convolution itself; a fresh tensor.

        With x >= 0 this is the same-sign sum of the outputs' positive contributions; its complement,
        z - P_pp - b+ = P_pn + b-, is the negative one (x >= 0 only: ``nonnegative_fast``). ``shift`` lets
        a rule fold a constant into the same pass (Gamma folds its stabilizer)."""
        bias = self.bias.clamp(min=0).flatten() if self.bias is not None else None
        if shift:
            channels = self.weight_pos.shape[1 if isinstance(self.module, CONV_TRANSPOSE_TYPES) else 0]
            bias = bias + shift if bias is not None else self.x.new_full((channels,), shift)
        return forward(self.module, self.x, self.weight_pos, bias, self.z)

    def pair_buffer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An uninitialised buffer shaped like z with twice the channels, and its two halves (a, b) for
        ``backproject_pair``: rules write their two per-output vectors straight into it."""
        z, dim = self.z, channel_dim(self.module)
        shape = list(z.shape)
        shape[dim] *= 2
        buf = torch.empty(shape, dtype=z.dtype, device=self.x.device)  # z may be a meta stand-in
        a, b = buf.chunk(2, dim=dim)
        return buf, a, b

    def backproject_pair(self, buf: torch.Tensor,
                         weights: Callable[[torch.Tensor, torch.Tensor], tuple]) -> torch.Tensor:
        """x (A^T a + B^T b) for x >= 0, with a and b the halves of ``buf``: one transposed operation through the
        stacked [A; B], where (A, B) = weights(W+, |W-|) (rules fold their constant factors into the weights, which
        costs a pass over the weights instead of one over the output; built once per call)."""
        def build() -> torch.Tensor:
            w_pos = self.weight_pos
            return stack_pair(self.module, *weights(w_pos, w_pos - self.weight))

        return input_vjp(self.module, self.x, self.call.memo("stacked", build), buf, self.z).mul_(self.x)

    # back-projection ------------------------------------------------------------------------------------------
    def backproject(self, g_pp, g_pn, g_np, g_nn) -> torch.Tensor:
        """x+ (W+^T g_pp + W-^T g_pn) + x- (W+^T g_np + W-^T g_nn); None entries count as zero.

        W+ and W- are applied separately (not W and W+, which would save nothing here): where a denominator
        is zero its huge ratio then meets exact zeros instead of cancelling against itself. Vectors for the
        same weight are stacked into one call.
        """
        needs_neg = (self.has_pos and g_pn is not None) or (self.has_neg and g_nn is not None)
        weight_neg = self.weight - self.weight_pos if needs_neg else None  # vgg16's first dense W- is 400 MB
        jobs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # (weight, vector, input part)
        if self.has_pos:
            jobs += [(self.weight_pos, g_pp, self.x_pos), (weight_neg, g_pn, self.x_pos)]
        if self.has_neg:
            jobs += [(self.weight_pos, g_np, self.x_neg), (weight_neg, g_nn, self.x_neg)]
        result = None
        for weight in (self.weight_pos, weight_neg):
            if weight is None:
                continue
            mine = [(v, part) for w, v, part in jobs if w is weight and v is not None]
            if not mine:
                continue
            stacked = mine[0][0] if len(mine) == 1 else torch.cat([v for v, _ in mine])
            vjps = input_vjp(self.module, self.x, weight, stacked, self.z)
            for (_, part), vjp in zip(mine, vjps.chunk(len(mine))):
                term = times_input(part, vjp)
                result = term if result is None else (result + term if torch.is_grad_enabled() else result.add_(term))
        return result if result is not None else torch.zeros_like(self.x)


class Products:
    """Lazy sign products of one call: only the ones a rule reads are computed (ZPlus never needs P_pn)."""

    def __init__(self, split: SignSplit) -> None:
        self.split = split
        self._cache: dict[str, torch.Tensor | None] = {}

    def _compute(self) -> None:
        sp, f = self.split, forward
        m, z = sp.module, sp.z
        if not sp.has_neg:
            self._cache.update(pp=f(m, sp.x_pos, sp.weight_pos, None, z), np=None, nn=None)
        elif not sp.has_pos:
            self._cache.update(pp=None, pn=None, np=f(m, sp.x_neg, sp.weight_pos, None, z))
        else:
            pp, np_ = f(m, torch.cat([sp.x_pos, sp.x_neg]), sp.weight_pos, None, z).chunk(2)
            nn_ = f(m, sp.x_neg, sp.weight - sp.weight_pos, None, z)
            self._cache.update(pp=pp, np=np_, nn=nn_)

    def _get(self, key: str) -> torch.Tensor | None:
        if not self._cache:
            self._compute()
        if key not in self._cache:  # the one product obtained by subtraction from z - b
            sp = self.split
            if sp.z.is_meta:  # the output was not kept (ZPlus): one more forward instead
                x = sp.x_pos if key == "pn" else sp.x_neg
                self._cache[key] = forward(sp.module, x, sp.weight - sp.weight_pos, None, sp.z)
            elif key == "pn":
                rest = sp.z_nobias
                for other in ("pp", "np", "nn"):
                    if self._cache.get(other) is not None:
                        rest = rest - self._cache[other]
                self._cache["pn"] = rest
            else:  # nn, x all non-positive
                self._cache["nn"] = sp.z_nobias - self._cache["np"]
        return self._cache[key]

    pp = property(lambda self: self._get("pp"))
    pn = property(lambda self: self._get("pn"))
    np = property(lambda self: self._get("np"))
    nn = property(lambda self: self._get("nn"))


def total(*terms: torch.Tensor | None) -> torch.Tensor:
    """The sum of the terms that are not None (at least one must be a tensor)."""
    present = [t for t in terms if t is not None]
    result = present[0]
    for t in present[1:]:
        result = result + t
    return result
