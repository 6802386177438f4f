"""Norm: for parameter-free layers (sums, average pools, upsampling). R_i = x_i dz_j/dx_i R_j / s(z_j).

Uses the module's own backward once (reusing the stored output); a module with several inputs (a residual
``Sum``) gives each input its share x_k * R / s(z).
"""

from __future__ import annotations

import torch

from lrpcli.engine.modules import Sum
from lrpcli.engine.rules.base import StabilizedRule


class Norm(StabilizedRule):
    """Relevance split in proportion to each input's contribution to the output."""

    name = "norm"
    proportional_to_inputs = True
    needs_graph = True  # the module's own backward, once

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ratio = self.stabilizer.divide(relevance, call.output)
        if _is_sum(call.module):
            last = len(call.inputs) - 1
            reuse = not torch.is_grad_enabled() and call.inputs[last].shape == ratio.shape
            # the last input's share goes into the ratio's own buffer: one fresh output-sized tensor less
            return tuple(_unbroadcast(torch.mul(x, ratio, out=ratio) if reuse and k == last else x * ratio, x)
                         for k, x in enumerate(call.inputs))
        grads = call.native_vjp(ratio)
        return tuple(None if g is None else x * g for x, g in zip(call.inputs, grads))


def _is_sum(module: torch.nn.Module) -> bool:
    return isinstance(module, Sum)


def _unbroadcast(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sum relevance over dimensions an input was broadcast along."""
    if r.shape == x.shape:
        return r
    extra = r.dim() - x.dim()
    if extra:
        r = r.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, (a, b) in enumerate(zip(r.shape, x.shape)) if b == 1 and a != 1)
    return r.sum(dim=dims, keepdim=True) if dims else r
