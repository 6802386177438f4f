"""Modules that stand for functional operations, so that the operations get rules.

The ``functional`` canonizer (torch.fx) puts calls of these in place of ``a * b``, ``a @ b``, ``x.mean(...)``,
``F.layer_norm(...)`` and the like; the ``attention`` canonizer builds ``ExplicitMultiheadAttention`` from an
``nn.MultiheadAttention``. Each computes exactly what the operation it replaces computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import Gate


class Product(nn.Module):
    """``Product()(a, b)`` = a * b, both factors activations (AttnLRP's uniform rule splits relevance)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class MatMul(nn.Module):
    """A product of two activations: ``torch.matmul`` (or ``bmm``, or a two-operand ``einsum`` equation), times
    an optional constant ``scale`` (the 1/sqrt(d) of attention scores, so the scaling passes no relevance)."""

    def __init__(self, fn: Callable[..., torch.Tensor] = torch.matmul, equation: str | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.equation = equation
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.einsum(self.equation, a, b) if self.equation is not None else self.fn(a, b)
        return out if self.scale is None else out * self.scale

    def extra_repr(self) -> str:
        parts = [f"equation={self.equation!r}"] if self.equation else [getattr(self.fn, "__name__", "matmul")]
        if self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        return ", ".join(parts)


class AttentionProduct(MatMul):
    """The product of attention weights with values; ``constant_index`` is the weights' operand (CP-LRP holds it
    constant, AttnLRP splits uniformly)."""

    def __init__(self, fn: Callable[..., torch.Tensor] = torch.matmul, equation: str | None = None,
                 constant_index: int = 0) -> None:
        super().__init__(fn, equation)
        self.constant_index = constant_index


class Scaled(nn.Module):
    """An operation linear in one activation, everything else constant (``x * layer_scale``, ``x / 8.0``,
    ``gamma * x``): relevance passes to the activation. ``position`` is where x goes in ``fn``'s arguments."""

    def __init__(self, fn: Callable[..., torch.Tensor], position: int = 0) -> None:
        super().__init__()
        self.fn = fn
        self.position = position

    def forward(self, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        args = rest[:self.position] + (x,) + rest[self.position:]
        return self.fn(*args)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class Reduce(nn.Module):
    """A linear, parameter-free reduction or pooling written functionally (``x.mean(dims)``,
    ``F.adaptive_avg_pool2d``): the Norm rule splits relevance by contribution."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: Sequence[Any] = (),
                 kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}, args={self.args}, kwargs={self.kwargs}"


def mean(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``x.mean(...)`` as a function (for ``Reduce``)."""
    return x.mean(*args, **kwargs)


class LayerNormFn(nn.Module):
    """``F.layer_norm(x, shape, weight, bias, eps)`` with weight and bias as inputs."""

    def __init__(self, normalized_shape: Sequence[int], eps: float = 1e-5) -> None:
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class _Projection(nn.Linear):
    """A Linear whose weight and bias are rows of another module's parameters (shared, not copied), so that the
    q, k and v parts of a packed in-projection are three Linear layers for the rules."""

    def __init__(self, source: nn.Module, weight: str, bias: str | None, rows: slice | None,
                 bias_rows: slice) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_source", source)  # not a child: the parameters stay the source's
        self._weight_name, self._bias_name, self._rows, self._bias_rows = weight, bias, rows, bias_rows
        w = self.weight
        self.out_features, self.in_features = w.shape[0], w.shape[1]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = getattr(self._source, self._weight_name)
        return w if self._rows is None else w[self._rows]

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        b = None if self._bias_name is None else getattr(self._source, self._bias_name)
        return None if b is None else b[self._bias_rows]


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as explicit steps: q/k/v projections (Linear), scores (MatMul with the
    1/sqrt(d) scale), Softmax, dropout, weights times values (AttentionProduct) and the shared out_proj.

    The parameters are the original module's own (nothing copied); it returns what the original returns.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.batch_first, self.embed_dim = h, mha.batch_first, e
        if mha._qkv_same_embed_dim:
            parts = [("in_proj_weight", slice(k * e, (k + 1) * e)) for k in range(3)]
        else:
            parts = [(f"{p}_proj_weight", None) for p in "qkv"]
        bias = "in_proj_bias" if mha.in_proj_bias is not None else None
        for (weight, rows), label, k in zip(parts, "qkv", range(3)):
            brows = slice(k * e, (k + 1) * e)
            self.add_module(f"{label}_proj", _Projection(mha, weight, bias, rows, brows))
        self.scores = MatMul(torch.matmul, scale=(e // h) ** -0.5)
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(mha.dropout)
        self.values = AttentionProduct(torch.matmul, constant_index=0)
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        n, length, e = q.shape
        h = self.num_heads
        q = q.reshape(n, length, h, e // h).transpose(1, 2)
        k = k.reshape(n, k.shape[1], h, e // h).transpose(1, 2)
        v = v.reshape(n, v.shape[1], h, e // h).transpose(1, 2)
        scores = self.scores(q, k.transpose(-2, -1))
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, scores)
        if mask is not None:
            scores = scores + mask
        weights = self.dropout(self.softmax(scores))
        out = self.values(weights, v).transpose(1, 2).reshape(n, length, e)
        out = self.out_proj(out)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        shown = weights.mean(dim=1) if average_attn_weights else weights
        return out, shown.squeeze(0) if unbatched else shown


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
                   scores: torch.Tensor) -> torch.Tensor | None:
    """One additive mask (0 / -inf, or the given floats) broadcasting against scores (N, H, L, S)."""
    total = None
    length, source = scores.shape[-2], scores.shape[-1]
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
    for mask, view in ((attn_mask, None), (key_padding_mask, "padding")):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(mask, float("-inf"))
        else:
            mask = mask.to(scores.dtype)
        if view == "padding":
            mask = mask.view(mask.shape[0], 1, 1, mask.shape[-1])
        elif mask.dim() == 3:  # (N * H, L, S)
            mask = mask.view(scores.shape[0], scores.shape[1], length, source)
        total = mask if total is None else total + mask
    return total


#: modules whose output is a product of their tensor inputs (the product rules apply)
PRODUCTS = (Product, MatMul, Gate)
#: modules that pass relevance to their activation unchanged
SCALES = (Scaled,)
#: parameter-free linear reductions (Norm)
REDUCTIONS = (Reduce,)
