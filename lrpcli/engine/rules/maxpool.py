"""MaxPool as if it were average pooling: each window's relevance split in proportion to its inputs.

The default for MaxPool is winner-takes-all (the ``Gradient`` rule), which gives speckled maps; this rule
spreads a window's relevance over all its inputs, R_i = sum_j x_i R_j / s(sum of window j), the Norm rule of
the average pool with the same window (the window size cancels). The forward output (the max) is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrpcli.engine.rules.base import Rule
from lrpcli.engine.rules.passthrough import MAX_POOLS
from lrpcli.engine.rules.stabilizer import Stabilizer

_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class MaxPoolAverage(Rule):
    """Relevance of a max-pool window distributed like average pooling (proportional to the inputs)."""

    name = "maxpool_average"
    reads = ("inputs",)

    def __init__(self, stabilizer: Stabilizer | float | None = None) -> None:
        self.stabilizer = Stabilizer.coerce(stabilizer)

    def check(self, module: nn.Module, name: str) -> None:
        ok = isinstance(module, MAX_POOLS)
        if not ok:
            raise ValueError(f"MaxPoolAverage applies to MaxPool layers; module {name!r} is {type(module).__name__}")
        dilation = getattr(module, "dilation", 1)
        if any(d != 1 for d in (dilation if isinstance(dilation, tuple) else (dilation,))):
            raise ValueError(f"MaxPoolAverage: module {name!r} uses dilation, which average pooling lacks")

    def _pool(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = x.dim() - 2
        if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return _ADAPTIVE[n](x, module.output_size)
        return _POOL[n](x, module.kernel_size, module.stride, module.padding, module.ceil_mode, True)

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = call.x
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xi = x if create_graph else x.detach().requires_grad_(True)
            pooled = self._pool(call.module, xi)
            ratio = relevance / self.stabilizer(pooled.detach() if not create_graph else pooled)
            (grad,) = torch.autograd.grad(pooled, xi, ratio, create_graph=create_graph)
        return (x * grad,)
