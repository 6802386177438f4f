"""Modules that stand for functional operations, so that the operations get rules.

The ``functional`` canonizer (torch.fx) puts calls of these in place of ``a * b``, ``a @ b``, ``x.mean(...)``,
``F.layer_norm(...)`` and the like; the ``attention`` canonizer builds ``ExplicitMultiheadAttention`` from an
``nn.MultiheadAttention``. Each computes exactly what the operation it replaces computes.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpcli.engine.modules import Gate, Sum

#: BatchNorms that ``merge_batchnorm`` folded into the layer before them (they run as the identity while merged);
#: the BatchNorm rule hands relevance through them unchanged
MERGED_BATCHNORMS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


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


class AttentionBias(Sum):
    """Attention logits plus a position bias made from parameters (Swin's relative position bias table, Swin V2's
    continuous position-bias MLP, MaxViT's): as a ``Sum`` (Norm) the bias takes its share of the logits'
    relevance and keeps it, as a layer's bias does, R_scores = scores R / s(scores + bias). Handing all of it
    to the scores instead multiplies it by (scores + bias) / scores, which explodes where the bias dominates.
    Callers pass the bias detached: no relevance flows into the parameters or the MLP that made it."""

    def forward(self, scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return scores + bias


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


class DotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as explicit steps: score MatMul (with the scale), the mask as a constant
    addend, Softmax, dropout, AttentionProduct."""

    def __init__(self, dropout: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 masked: bool = False) -> None:
        super().__init__()
        self.is_causal, self.scale, self.masked = is_causal, scale, masked
        self.scores = MatMul(torch.matmul)
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.values = AttentionProduct(torch.matmul, constant_index=0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.scores.scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        scores = self.scores(q, k.transpose(-2, -1))
        if self.is_causal:
            length, source = scores.shape[-2], scores.shape[-1]
            causal = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        return self.values(self.dropout(self.softmax(scores)), v)


class Normalize(nn.Module):
    """``F.normalize(x, dim)`` (Swin V2's cosine attention): with the norm held constant it only rescales, so
    relevance passes unchanged (as the LayerNorm rule holds the divisor constant)."""

    def __init__(self, dim: int = -1, eps: float = 1e-12) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=self.dim, eps=self.eps)


class ExplicitWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (Swin V1) and ``ShiftedWindowAttentionV2`` as explicit steps.

    The fused ``shifted_window_attention`` function is opaque to hooks and to torch.fx. Here the q/k/v parts of
    ``qkv`` are Linear layers, the scores a MatMul (V1: with the 1/sqrt(d) scale; V2: of the normalised q and k,
    then times the clamped logit scale), then the Softmax and the AttentionProduct; ``proj`` is the original
    layer. The relative position bias is an ``AttentionBias`` (it absorbs its share); the shift mask is a
    constant addend (relevance passes to the scores).
    The windows, shifts and padding are computed exactly as torchvision does, from the same parameters.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_source", source)  # not a child: qkv's parameters stay the source's
        self.v2 = hasattr(source, "logit_scale")
        dim = source.proj.in_features
        heads = source.num_heads
        bias = "bias" if source.qkv.bias is not None else None
        for k, label in enumerate("qkv"):
            rows = slice(k * dim, (k + 1) * dim)
            # V2 uses no key bias (torchvision zeroes that third of qkv's bias in the forward)
            self.add_module(f"{label}_proj", _Projection(source.qkv, "weight", None if self.v2 and k == 1 else bias,
                                                         rows, rows))
        if self.v2:
            self.q_norm, self.k_norm = Normalize(-1), Normalize(-1)
            self.scores = MatMul(torch.matmul)
            self.logit = Scaled(torch.mul, 0)
        else:
            self.scores = MatMul(torch.matmul, scale=(dim // heads) ** -0.5)
        self.position_bias = AttentionBias()
        self.softmax = nn.Softmax(dim=-1)
        self.attention_dropout = nn.Dropout(source.attention_dropout)
        self.values = AttentionProduct(torch.matmul, constant_index=0)
        self.proj = source.proj
        self.dropout = nn.Dropout(source.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self._source
        window, heads = list(src.window_size), src.num_heads
        b, h, w, c = x.shape
        pad_r = (window[1] - w % window[1]) % window[1]
        pad_b = (window[0] - h % window[0]) % window[0]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pad_h, pad_w = x.shape[1], x.shape[2]
        shift = [0 if window[0] >= pad_h else src.shift_size[0], 0 if window[1] >= pad_w else src.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (pad_h // window[0]) * (pad_w // window[1])
        # (batch, windows, tokens, channels): the batch stays the first dimension in every module (torchvision
        # folds the windows into it), so per-sample statistics (the Recorder, ``debug``) see samples
        x = x.view(b, pad_h // window[0], window[0], pad_w // window[1], window[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, windows, window[0] * window[1], c)
        length = x.shape[2]

        def heads_of(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, windows, length, heads, c // heads).transpose(2, 3)

        q, k, v = heads_of(self.q_proj(x)), heads_of(self.k_proj(x)), heads_of(self.v_proj(x))
        if self.v2:
            attn = self.scores(self.q_norm(q), self.k_norm(k).transpose(-2, -1))
            attn = self.logit(attn, torch.clamp(src.logit_scale, max=math.log(100.0)).exp())
        else:
            attn = self.scores(q, k.transpose(-2, -1))
        attn = self.position_bias(attn, src.get_relative_position_bias().detach())
        if sum(shift) > 0:
            attn = attn + _shift_mask(x, pad_h, pad_w, window, shift, windows).unsqueeze(1)
        attn = self.attention_dropout(self.softmax(attn))
        x = self.values(attn, v).transpose(2, 3).reshape(b, windows, length, c)
        x = self.dropout(self.proj(x))
        x = x.view(b, pad_h // window[0], pad_w // window[1], window[0], window[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


def _shift_mask(x: torch.Tensor, pad_h: int, pad_w: int, window: list[int], shift: list[int],
                windows: int) -> torch.Tensor:
    """The -100 / 0 mask that keeps shifted windows from attending across the image border (as torchvision)."""
    mask = x.new_zeros((pad_h, pad_w))
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


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
SCALES = (Scaled, Normalize)
#: parameter-free linear reductions (Norm)
REDUCTIONS = (Reduce,)
