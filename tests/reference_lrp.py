"""A slow, dense, deliberately naive reference for the LRP rules (README, "Rules"; the formulas as the cited
papers state them).

Nothing here imports lrpcli. Every layer is turned into an explicit dense matrix per sample:
``A[j, i] = d z_j / d x_i`` for the bias-free layer, flattened over all non-batch dimensions. Modified
weights (W+, W-, W^2, W + g W+, all-ones for connectivity) are handled by building the dense matrix of a
*copy* of the layer whose weight was replaced, never by editing the original layer. The formulas are then
evaluated per sample with explicit matrix / element-wise operations in float64.

Rules are described by :class:`RefRule`, a plain record that is independent of the engine's rule classes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

PARAM_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass(frozen=True)
class RefRule:
    """Plain description of a rule for the reference.

    name: one of 'epsilon', 'zplus', 'alphabeta', 'gamma', 'zbox', 'flat', 'wsquare', 'norm'.
    eps / mode: the stabilizer (for 'epsilon' eps is the rule's epsilon).
    zero_bias: the rule was built with zero_params=['bias'].
    low / high: ZBox bounds, a number or a per-channel sequence.
    """

    name: str
    eps: float = 1e-6
    mode: str = 'sign'
    zero_bias: bool = False
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    low: float | tuple = 0.0
    high: float | tuple = 0.0


# ----------------------------------------------------------------------------------------------------------
# stabilizer


def sign_pos(z: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1."""
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def stabilize(den: torch.Tensor, eps: float, mode: str = 'sign') -> torch.Tensor:
    """Stabilize the denominator of ONE sample (any shape; rms is taken over all its elements)."""
    sgn = sign_pos(den)
    if mode == 'sign':
        return den + eps * sgn
    if mode == 'clip':
        return sgn * torch.clamp(den.abs(), min=eps)
    if mode == 'rms':
        rms = torch.sqrt(torch.mean(den * den))
        if rms == 0:  # an all-zero denominator: eps itself (numerators are zero too, relevance 0, not 0/0)
            rms = torch.ones_like(rms)
        return den + sgn * eps * rms
    raise ValueError(f'unknown stabilizer mode {mode!r}')


# ----------------------------------------------------------------------------------------------------------
# dense matrices


def _apply_to_basis(fn, in_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Dense matrix of a linear map fn (batch -> batch): column i is fn(e_i) flattened."""
    n_in = 1
    for s in in_shape:
        n_in *= s
    basis = torch.eye(n_in, dtype=dtype).reshape(n_in, *in_shape)
    with torch.no_grad():
        out = fn(basis)
    return out.reshape(n_in, -1).T.contiguous()  # (n_out, n_in)


def dense_matrix(layer: nn.Module, in_shape: tuple[int, ...],
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Dense per-sample matrix of a bias-free COPY of `layer`, optionally with `weight` substituted."""
    c = copy.deepcopy(layer)
    with torch.no_grad():
        if weight is not None:
            c.weight = nn.Parameter(weight.detach().clone())
        c.bias = None
    return _apply_to_basis(c, in_shape, layer.weight.dtype)


def output_shape(layer: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        probe = torch.zeros((1, *in_shape), dtype=layer.weight.dtype)
        return tuple(layer(probe).shape[1:])


def bias_vector(layer: nn.Module, out_shape: tuple[int, ...]) -> torch.Tensor:
    """The bias expanded to one value per (flattened) output element; zeros if the layer has none."""
    n_out = 1
    for s in out_shape:
        n_out *= s
    if layer.bias is None:
        return torch.zeros(n_out, dtype=layer.weight.dtype)
    b = layer.bias.detach()
    view = (out_shape[0],) + (1,) * (len(out_shape) - 1)
    return b.reshape(view).expand(out_shape).reshape(-1).clone()


def per_input(value, in_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Expand a scalar or a per-channel sequence (channel = dim 0 of the per-sample shape) to in_shape."""
    t = torch.as_tensor(value, dtype=dtype)
    if t.dim() == 0:
        return t.expand(in_shape).reshape(-1).clone()
    assert t.numel() == in_shape[0], (t.shape, in_shape)
    view = (in_shape[0],) + (1,) * (len(in_shape) - 1)
    return t.reshape(view).expand(in_shape).reshape(-1).clone()


# ----------------------------------------------------------------------------------------------------------
# the rules on parameter layers


def reference_lrp(layer: nn.Module, x: torch.Tensor, relevance: torch.Tensor, rule: RefRule):
    """Relevance at the input of `layer` for the batch `x` and upper relevance `relevance`.

    Returns (R_in, dens): R_in shaped like x; dens is a list of per-sample denominators (before
    stabilization) whose sign is not guaranteed by the rule (used by tests to avoid ill-conditioned data).
    """
    assert isinstance(layer, PARAM_LAYERS), type(layer)
    in_shape = tuple(x.shape[1:])
    out_shape = output_shape(layer, in_shape)
    W = layer.weight.detach()
    dt = W.dtype

    A = dense_matrix(layer, in_shape)
    b = bias_vector(layer, out_shape)
    if rule.zero_bias:
        b = torch.zeros_like(b)
    Ap = dense_matrix(layer, in_shape, W.clamp(min=0))
    An = dense_matrix(layer, in_shape, W.clamp(max=0))

    def s(d):
        return stabilize(d, rule.eps, rule.mode)

    out_rows, signed_dens = [], []
    for n in range(x.shape[0]):
        xv = x[n].reshape(-1).to(dt)
        R = relevance[n].reshape(-1).to(dt)
        xp, xn = xv.clamp(min=0), xv.clamp(max=0)

        if rule.name == 'epsilon':
            Z = A * xv[None, :]
            z = Z.sum(1) + b
            r = Z.T @ (R / s(z))
            signed_dens.append(z)
        elif rule.name == 'zplus':
            P = Ap * xp[None, :] + An * xn[None, :]
            den = P.sum(1) + b.clamp(min=0)
            r = P.T @ (R / s(den))
        elif rule.name == 'alphabeta':
            P = Ap * xp[None, :] + An * xn[None, :]
            N = An * xp[None, :] + Ap * xn[None, :]
            den_p = P.sum(1) + b.clamp(min=0)
            den_n = N.sum(1) + b.clamp(max=0)
            r = rule.alpha * (P.T @ (R / s(den_p))) - rule.beta * (N.T @ (R / s(den_n)))
        elif rule.name == 'gamma':
            g = rule.gamma
            Ma = dense_matrix(layer, in_shape, W + g * W.clamp(min=0))  # same-sign-as-positive-output part
            Mb = dense_matrix(layer, in_shape, W + g * W.clamp(max=0))
            z = A @ xv + b
            pos = z >= 0
            C_pos = Ma * xp[None, :] + Mb * xn[None, :]
            C_neg = Mb * xp[None, :] + Ma * xn[None, :]
            C = torch.where(pos[:, None], C_pos, C_neg)
            b_mod = torch.where(pos, b + g * b.clamp(min=0), b + g * b.clamp(max=0))
            den = C.sum(1) + b_mod
            r = C.T @ (R / s(den))
            signed_dens.append(z)
        elif rule.name == 'zbox':
            lo = per_input(rule.low, in_shape, dt)
            hi = per_input(rule.high, in_shape, dt)
            C = A * xv[None, :] - Ap * lo[None, :] - An * hi[None, :]
            den = C.sum(1)
            r = C.T @ (R / s(den))
            signed_dens.append(den)
        elif rule.name == 'flat':
            ones = dense_matrix(layer, in_shape, torch.ones_like(W))
            conn = (ones != 0).to(dt)
            den = conn.sum(1)
            r = conn.T @ (R / s(den))
        elif rule.name == 'wsquare':
            S = dense_matrix(layer, in_shape, W * W)
            den = S.sum(1) + b * b
            r = S.T @ (R / s(den))
        else:
            raise ValueError(f'rule {rule.name!r} is not a parameter rule')
        out_rows.append(r.reshape(in_shape))
    return torch.stack(out_rows), signed_dens


# ----------------------------------------------------------------------------------------------------------
# Norm on parameter-free layers, and Sum


def reference_norm(layer: nn.Module, x: torch.Tensor, relevance: torch.Tensor, eps: float = 1e-6,
                   mode: str = 'sign'):
    """Norm rule on a parameter-free linear layer (AvgPool*, AdaptiveAvgPool*, Upsample)."""
    in_shape = tuple(x.shape[1:])
    J = _apply_to_basis(layer, in_shape, x.dtype)
    rows, dens = [], []
    for n in range(x.shape[0]):
        xv = x[n].reshape(-1)
        Z = J * xv[None, :]
        z = Z.sum(1)
        rows.append((Z.T @ (relevance[n].reshape(-1) / stabilize(z, eps, mode))).reshape(in_shape))
        dens.append(z)
    return torch.stack(rows), dens


def reference_sum(inputs: list[torch.Tensor], relevance: torch.Tensor, eps: float = 1e-6, mode: str = 'sign'):
    """Norm rule on an element-wise sum of several tensors: input k gets x_k * R / s(z)."""
    z = sum(inputs)
    outs = [torch.zeros_like(t) for t in inputs]
    for n in range(z.shape[0]):
        q = relevance[n] / stabilize(z[n], eps, mode)
        for k, t in enumerate(inputs):
            outs[k][n] = t[n] * q
    return outs, [z[n].reshape(-1) for n in range(z.shape[0])]
