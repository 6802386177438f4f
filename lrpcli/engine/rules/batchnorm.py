"""BatchNorm rule: the Epsilon rule on a BatchNorm that could not be merged into the layer before it.

In eval mode a BatchNorm is a per-channel affine map y = a x + b, a = w / sqrt(var + eps), b = beta - mean a
(running statistics; batch statistics in training mode or without running ones). It is a diagonal linear layer,
and the Epsilon rule on it reads

    R_i = a_c x_i R_i / s(z_i),   z = y  (or z = a x with ``zero_params: [bias]``: the whole shift b is the bias)

so the shift takes its share of relevance as any bias does and the scale enters the ratio. Pass, which
hands R on unchanged, is the special case b = 0. DenseNet's BatchNorms follow a concatenation (no single layer
to fold them into) and precede a ReLU (none to fold them forward into): this rule is what respects them.

A BatchNorm that ``merge_batchnorm`` folded runs as the identity; this rule then hands relevance on unchanged
and keeps nothing (``functional_modules.MERGED_BATCHNORMS``), so it is safe to give to every BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from lrpcli.engine.functional_modules import MERGED_BATCHNORMS
from lrpcli.engine.rules.layernorm import NormalisationRule


def scale_shift(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor,
                affine_params: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel a, b of ``bn`` as ``a * x + b`` for the given statistics (its weight and bias if it has
    them, or ``affine_params`` in their place): what the rule applies and what merging into the layer before
    folds in."""
    weight, bias = (getattr(bn, "weight", None), getattr(bn, "bias", None)) if affine_params is None \
        else affine_params
    a = torch.rsqrt(var + bn.eps)
    if weight is not None:
        a = weight * a
    b = -mean * a
    if bias is not None:
        b = b + bias
    return a, b


def affine(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of y = a x + b for ``module`` applied to ``x``, shaped to broadcast against x."""
    batch_stats = module.training or getattr(module, "running_mean", None) is None
    if batch_stats:
        dims = (0,) + tuple(range(2, x.dim()))
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    a, b = scale_shift(module, mean, var)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return a.to(x.dtype).view(view), b.to(x.dtype).view(view)


def _batchnorm_types() -> tuple[type, ...]:
    found: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
    try:
        from torchvision.ops import FrozenBatchNorm2d
    except Exception:  # pragma: no cover - torchvision missing
        return found
    return found + (FrozenBatchNorm2d,)


class BatchNormRule(NormalisationRule):
    """Epsilon on the BatchNorm's per-channel affine map (see the module docstring)."""

    name = "batchnorm"

    def check(self, module: nn.Module, name: str) -> None:
        if not isinstance(module, _batchnorm_types()):
            raise ValueError(f"BatchNormRule applies to BatchNorm1d/2d/3d, SyncBatchNorm and FrozenBatchNorm2d; "
                             f"module {name!r} is {type(module).__name__}")

    def reads_of(self, module: nn.Module) -> tuple[str, ...]:
        return () if module in MERGED_BATCHNORMS else self.reads

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if call.module in MERGED_BATCHNORMS:  # folded into the layer before: the identity
            return (relevance,)
        x = call.x
        a, b = affine(call.module, x)
        z = call.output - b if "bias" in self.zero_params else call.output
        return (x * a * self.stabilizer.divide(relevance, z),)
