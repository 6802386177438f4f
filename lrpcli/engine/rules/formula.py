"""The plain path: every rule computed as its formula reads, with none of the engine's shortcuts.

The rules' own ``relevance`` methods take shortcuts that change no number: fused sign-split passes, stacked
weights, matrix products for 1x1 convolutions, batch slicing, outputs kept as relu(z), in-place buffers. Under
``plain()`` (or with the environment variable LRPCLI_PLAIN=1) the hooks run the functions here instead, written
from the formulas of the LRP papers (Bach et al. 2015; Montavon et al. 2019, "Layer-wise Relevance Propagation:
an overview"): each relevance is R_i = sum_j c_ij R_j / s(sum_i c_ij), with the products c_ij = x_i M_ji of a
weight M, the layer's operation f(x; M) run by torch.nn.functional and the transposed operation M^T v taken by
autograd. Comparing the two paths (tests/test_plain_path.py) checks every shortcut against its formula.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lrpcli.engine import layerops
from lrpcli.engine.rules.alphabeta import AlphaBeta
from lrpcli.engine.rules.base import ParamRule, Rule, total
from lrpcli.engine.rules.epsilon import Epsilon
from lrpcli.engine.rules.flat import Flat, WSquare
from lrpcli.engine.rules.gamma import Gamma
from lrpcli.engine.rules.norm import Norm, _is_sum, _unbroadcast
from lrpcli.engine.rules.stabilizer import Stabilizer, sign0
from lrpcli.engine.rules.zbox import ZBox, expand_bound
from lrpcli.engine.rules.zplus import ZPlus

_state = {"on": os.environ.get("LRPCLI_PLAIN", "").strip() not in ("", "0")}


def enabled() -> bool:
    """True while the plain path is switched on (``plain()`` or LRPCLI_PLAIN=1 at import)."""
    return _state["on"]


@contextlib.contextmanager
def plain(on: bool = True) -> Iterator[None]:
    """Run the rules' plain, formula-shaped path inside this block (read when a layer runs and when its
    relevance is computed): for checking the fast paths, not for speed."""
    previous, _state["on"] = _state["on"], on
    try:
        yield
    finally:
        _state["on"] = previous


# -- the layer as a function of its weight --------------------------------------------------------------------
def layer(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          z: torch.Tensor) -> torch.Tensor:
    """f(x; W, b): the module's operation with the given weight and bias (z gives a transposed convolution's
    output size)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, layerops.CONV_TYPES):
        return module._conv_forward(x, weight, bias)
    conv_transpose = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[x.dim() - 2]
    padding = layerops._transpose_output_padding(module, x, z)
    return conv_transpose(x, weight, bias, module.stride, module.padding, padding, module.groups, module.dilation)


def transposed(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, v: torch.Tensor,
               z: torch.Tensor) -> torch.Tensor:
    """M^T v: the gradient of <f(x; M), v> with respect to x (f is linear in x; x gives only the shape)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xi = torch.zeros_like(x, device=v.device).requires_grad_(True)
        (grad,) = torch.autograd.grad(layer(module, xi, weight, None, z), xi, v, create_graph=create_graph)
    return grad


def stabilize(stabilizer: Stabilizer, z: torch.Tensor) -> torch.Tensor:
    """s(z): z + eps sign(z) with sign(0) = +1 (sign mode); the other modes as ``Stabilizer`` defines them."""
    if stabilizer.mode == "sign":
        return z + stabilizer.epsilon * sign0(z)
    return stabilizer(z)


def _parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.clamp(min=0), t.clamp(max=0)


def _bias(module: nn.Module, bias: torch.Tensor | None, z: torch.Tensor, rule: ParamRule) -> torch.Tensor | None:
    """The bias as it broadcasts over z, or None where the layer has none or the rule zeroes it."""
    if bias is None or rule.zero_bias:
        return None
    return bias.view(layerops.bias_shape(module, z))



# -- the parameter rules ---------------------------------------------------------------------------------------
def epsilon(rule: Epsilon, call, relevance: torch.Tensor) -> torch.Tensor:
    """R_i = x_i sum_j W_ji R_j / s(z_j), z the layer's output (without its bias under zero_params)."""
    (m, x, z), (w, b) = (call.module, call.x, call.output), call.params()
    den = z - b.view(layerops.bias_shape(m, z)) if rule.zero_bias and b is not None else z
    return x * transposed(m, x, w, relevance / stabilize(rule.stabilizer, den), z)


def zplus(rule: ZPlus, call, relevance: torch.Tensor) -> torch.Tensor:
    """R_i = sum_j (x+_i W+_ji + x-_i W-_ji) R_j / s(sum_i (x+ W+ + x- W-)_ij + b+_j)."""
    (m, x, z), (w, b) = (call.module, call.x, call.output), call.params()
    (xp, xn), (wp, wn) = _parts(x), _parts(w)
    b = _bias(m, b, z, rule)
    den = total(layer(m, xp, wp, None, z), layer(m, xn, wn, None, z), None if b is None else b.clamp(min=0))
    r = relevance / stabilize(rule.stabilizer, den)
    return xp * transposed(m, x, wp, r, z) + xn * transposed(m, x, wn, r, z)


def alpha_beta(rule: AlphaBeta, call, relevance: torch.Tensor) -> torch.Tensor:
    """R_i = sum_j [alpha (x+W+ + x-W-)_ij / s(z+_j) - beta (x+W- + x-W+)_ij / s(z-_j)] R_j, with
    z+ = sum_i (x+W+ + x-W-)_ij + b+_j and z- = sum_i (x+W- + x-W+)_ij + b-_j."""
    (m, x, z), (w, b) = (call.module, call.x, call.output), call.params()
    (xp, xn), (wp, wn) = _parts(x), _parts(w)
    b = _bias(m, b, z, rule)
    bp, bn = (None, None) if b is None else _parts(b)
    z_pos = total(layer(m, xp, wp, None, z), layer(m, xn, wn, None, z), bp)
    z_neg = total(layer(m, xp, wn, None, z), layer(m, xn, wp, None, z), bn)
    r_pos = relevance / stabilize(rule.stabilizer, z_pos)
    r_neg = relevance / stabilize(rule.stabilizer, z_neg)
    positive = xp * transposed(m, x, wp, r_pos, z) + xn * transposed(m, x, wn, r_pos, z)
    negative = xp * transposed(m, x, wn, r_neg, z) + xn * transposed(m, x, wp, r_neg, z)
    return rule.alpha * positive - rule.beta * negative


def gamma(rule: Gamma, call, relevance: torch.Tensor) -> torch.Tensor:
    """For z_j >= 0: x+ with W + gW+, x- with W + gW-, bias b + gb+; for z_j < 0: x+ with W + gW-, x- with
    W + gW+, bias b + gb-. R_i = sum_j c_ij R_j / s(sum_i c_ij + bias_j)."""
    (m, x, z), (w, b) = (call.module, call.x, call.output), call.params()
    (xp, xn), (wp, wn), g = _parts(x), _parts(w), rule.gamma
    b = _bias(m, b, z, rule)
    bp, bn = (None, None) if b is None else _parts(b)
    z_rule = total(layer(m, x, w, None, z), b)
    up = (z_rule >= 0).to(z_rule.dtype)  # 1 where z_j >= 0
    w_boost_pos, w_boost_neg = w + g * wp, w + g * wn
    den_up = total(layer(m, xp, w_boost_pos, None, z), layer(m, xn, w_boost_neg, None, z),
                   None if b is None else b + g * bp)
    den_down = total(layer(m, xp, w_boost_neg, None, z), layer(m, xn, w_boost_pos, None, z),
                     None if b is None else b + g * bn)
    r = relevance / stabilize(rule.stabilizer, up * den_up + (1 - up) * den_down)
    r_up, r_down = r * up, r * (1 - up)
    to_pos = transposed(m, x, w_boost_pos, r_up, z) + transposed(m, x, w_boost_neg, r_down, z)
    to_neg = transposed(m, x, w_boost_neg, r_up, z) + transposed(m, x, w_boost_pos, r_down, z)
    return xp * to_pos + xn * to_neg


def zbox(rule: ZBox, call, relevance: torch.Tensor) -> torch.Tensor:
    """c_ij = x_i W_ji - l_i W+_ji - h_i W-_ji; R_i = sum_j c_ij R_j / s(sum_i c_ij): the bias never enters."""
    (m, x, z), (w, _) = (call.module, call.x, call.output), call.params()
    wp, wn = _parts(w)
    low, high = expand_bound(rule.low, x), expand_bound(rule.high, x)
    den = layer(m, x, w, None, z) - layer(m, low, wp, None, z) - layer(m, high, wn, None, z)
    r = relevance / stabilize(rule.stabilizer, den)
    return x * transposed(m, x, w, r, z) - low * transposed(m, x, wp, r, z) - high * transposed(m, x, wn, r, z)


def flat(rule: Flat, call, relevance: torch.Tensor) -> torch.Tensor:
    """R_i = sum_j 1[i feeds j] R_j / s(#inputs feeding j): the weights all ones, the bias ignored."""
    (m, x, z), (w, _) = (call.module, call.x, call.output), call.params()
    ones = torch.ones_like(w)
    den = layer(m, torch.ones_like(x[:1]), ones, None, z)
    return transposed(m, x, ones, relevance / stabilize(rule.stabilizer, den), z)


def wsquare(rule: WSquare, call, relevance: torch.Tensor) -> torch.Tensor:
    """R_i = sum_j W_ji^2 R_j / s(sum_i W_ji^2 + b_j^2)."""
    (m, x, z), (w, b) = (call.module, call.x, call.output), call.params()
    b = _bias(m, b, z, rule)
    den = total(layer(m, torch.ones_like(x[:1]), w * w, None, z), None if b is None else b * b)
    return transposed(m, x, w * w, relevance / stabilize(rule.stabilizer, den), z)


# -- parameter-free layers -------------------------------------------------------------------------------------
def norm(rule: Norm, call, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """R_i = x_i dz_j/dx_i R_j / s(z_j); for a sum z = sum_k x_k, each input's share x_k R / s(z)."""
    ratio = relevance / stabilize(rule.stabilizer, call.output)
    if _is_sum(call.module):
        return tuple(_unbroadcast(x * ratio, x) for x in call.inputs)
    grads = call.native_vjp(ratio)
    return tuple(None if g is None else x * g for x, g in zip(call.inputs, grads))


_FORMULAS: dict[type[Rule], Callable] = {
    Epsilon: epsilon, ZPlus: zplus, AlphaBeta: alpha_beta, Gamma: gamma, ZBox: zbox, Flat: flat,
    WSquare: wsquare, Norm: norm,
}


def relevance(rule: Rule, call, upper: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The relevance at each input of ``call`` by the rule's formula. Rules without shortcuts (Pass, Gradient,
    the ReLU variants, MaxPoolAverage) are their formula already and run as they are."""
    formula = _FORMULAS.get(type(rule))
    if formula is None:
        return rule.relevance(call, upper)
    result = formula(rule, call, upper)
    return result if isinstance(result, tuple) else (result,) + (None,) * (len(call.inputs) - 1)


__all__ = ["enabled", "plain", "relevance", "layer", "transposed", "stabilize"]
