"""LayerNorm rule (AttnLRP, Achtibat et al., ICML 2024, section 3.3; CP-LRP, Ali et al., ICML 2022, section 3.2).

A normalisation y = w * (x - mean(x)) / sigma(x) + b is not linear in x, but it is once its divisor sigma is
treated as a constant (what both papers do: the division only rescales, it decides nothing). The remaining map
x -> w * (x - mean(x)) / sigma is linear, and the rule is the Epsilon rule on it:

    R_i = x_i * sum_j J_ji R_j / s(z_j),   J_ji = w_j (delta_ij - 1/N) / sigma,   z_j = y_j  (or y_j - b_j)

with N the size of the normalised group. Without a bias (or with ``zero_params: [bias]``) it is conservative:
sum_i x_i J_ji = z_j. RMSNorm has no centring (J_ji = w_j delta_ij / sigma, relevance stays where it is);
GroupNorm normalises over groups of channels and scales per channel; torchvision's and timm's LayerNorm2d
normalise over the channel dimension of an NCHW tensor (timm's LayerNorm is nn.LayerNorm's computation).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lrpcli.engine.functional_modules import LayerNormFn
from lrpcli.engine.rules.base import Rule, checked_zero_params
from lrpcli.engine.rules.stabilizer import Stabilizer


@dataclass
class NormLayout:
    """Where a normalisation layer normalises, and its affine parameters shaped to broadcast against x."""

    dims: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    centre: bool
    groups: int = 0  # GroupNorm: x is viewed as (N, groups, -1) for the statistics


def _timm_norm(*names: str) -> tuple[type, ...]:
    """timm's normalisation classes of these names, where timm is already imported (a timm model is): timm's
    ``LayerNorm`` is ``nn.LayerNorm`` with its own forward (``F.layer_norm`` or a fused kernel, same result),
    its ``LayerNorm2d`` normalises the channels of NCHW as torchvision's does."""
    norm = sys.modules.get("timm.layers.norm")
    return tuple(c for c in (getattr(norm, n, None) for n in names) if isinstance(c, type)) if norm else ()


def _layernorm2d() -> tuple[type, ...]:
    try:
        from torchvision.models.convnext import LayerNorm2d
    except Exception:  # pragma: no cover - torchvision missing
        return _timm_norm("LayerNorm2d")
    return (LayerNorm2d,) + _timm_norm("LayerNorm2d")


def norm_types() -> tuple[type, ...]:
    """The module types the LayerNorm rule knows the layout of."""
    return (nn.LayerNorm, nn.GroupNorm, LayerNormFn) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def layout(module: nn.Module, x: torch.Tensor, inputs: Sequence[torch.Tensor] = ()) -> NormLayout:
    """The normalised dimensions and affine parameters of ``module`` applied to ``x``."""
    if isinstance(module, _layernorm2d()):
        view = (-1,) + (1,) * (x.dim() - 2)
        w = None if module.weight is None else module.weight.view(view)
        b = None if module.bias is None else module.bias.view(view)
        return NormLayout((1,), w, b, module.eps, True)
    if isinstance(module, nn.GroupNorm):
        view = (-1,) + (1,) * (x.dim() - 2)
        w = None if module.weight is None else module.weight.view(view)
        b = None if module.bias is None else module.bias.view(view)
        return NormLayout((2,), w, b, module.eps, True, groups=module.num_groups)
    if isinstance(module, LayerNormFn):
        w = inputs[1] if len(inputs) > 1 else None
        b = inputs[2] if len(inputs) > 2 else None
        dims = tuple(range(-len(module.normalized_shape), 0))
        return NormLayout(dims, w, b, module.eps, True)
    dims = tuple(range(-len(module.normalized_shape), 0))
    eps = module.eps
    if eps is None:  # RMSNorm's default
        eps = torch.finfo(x.dtype).eps
    return NormLayout(dims, module.weight, getattr(module, "bias", None), eps, isinstance(module, nn.LayerNorm))


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(t.shape[0], groups, -1) if groups else t


class NormalisationRule(Rule):
    """What the normalisation rules share: a stabilizer and the parameters left out (``zero_params``)."""

    proportional_to_inputs = True

    def __init__(self, stabilizer: Stabilizer | float | None = None, zero_params: Sequence[str] = ()) -> None:
        self.stabilizer = Stabilizer.coerce(stabilizer)
        self.zero_params = checked_zero_params(type(self).__name__, zero_params)

    def _repr_parts(self) -> list[str]:
        parts = []
        if self.stabilizer != Stabilizer():
            parts.append(f"stabilizer={self.stabilizer.epsilon:g}/{self.stabilizer.mode}")
        if self.zero_params:
            parts.append(f"zero_params={list(self.zero_params)}")
        return parts


class LayerNormRule(NormalisationRule):
    """Epsilon rule on the normalisation with its divisor held constant (LayerNorm, RMSNorm, GroupNorm)."""

    name = "layernorm"

    def check(self, module: nn.Module, name: str) -> None:
        known = norm_types()
        custom = isinstance(module, nn.LayerNorm) and type(module).forward is not nn.LayerNorm.forward \
            and not isinstance(module, _layernorm2d() + _timm_norm("LayerNorm"))
        if not isinstance(module, known) or custom:
            raise ValueError(f"LayerNormRule applies to LayerNorm, LayerNorm2d, RMSNorm and GroupNorm; module "
                             f"{name!r} is {type(module).__name__}")

    def splits_over_batch(self, call) -> bool:
        # LayerNormFn takes its weight and bias as inputs: they have no batch dimension to slice
        return len(call.inputs) == 1

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x = call.x
        lay = layout(call.module, x, call.inputs)
        z = call.output
        if lay.bias is not None and "bias" in self.zero_params:
            z = z - lay.bias
        ratio = self.stabilizer.divide(relevance, z)
        if lay.weight is not None:
            ratio = ratio * lay.weight
        xg = _grouped(x, lay.groups)
        if lay.centre:
            var = xg.var(dim=lay.dims, unbiased=False, keepdim=True)
        else:
            var = xg.pow(2).mean(dim=lay.dims, keepdim=True)
        a = _grouped(ratio, lay.groups) / (var + lay.eps).sqrt()
        if lay.centre:
            a = a - a.mean(dim=lay.dims, keepdim=True)
        result = x * a.reshape(x.shape)
        return (result,) + (None,) * (len(call.inputs) - 1)
