"""ZPlus: only positive contributions, generalised to signed inputs (x+ with W+, x- with W-, bias b+)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrpcli.engine.rules.base import ParamRule, total
from lrpcli.engine.rules.signsplit import SignSplit

#: dense weights larger than this are turned into W+ one block of rows at a time
BLOCK_BYTES = 64 * 2**20


class ZPlus(ParamRule):
    """R_i = sum_j (x+_i W+_ji + x-_i W-_ji) R_j / s(sum_i (x+ W+ + x- W-) + b+_j)."""

    name = "zplus"
    proportional_to_inputs = True
    reads = ("inputs",)  # the denominator is built from products alone: the output need not be kept

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = SignSplit(call, self.zero_bias)
        if self._in_blocks(split):
            return (self._dense_in_blocks(split, relevance),)
        ratio = self.stabilizer.divide(relevance, total(split.aligned, split.bias_pos()))
        return (split.backproject(ratio, None),)

    def _in_blocks(self, split: SignSplit) -> bool:
        w = split.weight
        return (isinstance(split.module, nn.Linear) and split.first_order_nonnegative
                and self.stabilizer.mode != "rms" and w.numel() * w.element_size() > BLOCK_BYTES)

    def _dense_in_blocks(self, split: SignSplit, relevance: torch.Tensor) -> torch.Tensor:
        """x >= 0 through a large dense layer with W+ formed for a block of outputs at a time.

        The ratio of output j depends on output j alone, so each block of rows of W+ serves its forward and its
        share of the transposed product, and W+ (as large as the layer's weight) never exists whole.
        """
        w, x = split.weight, split.x
        bias = split.bias_pos()
        rows = max(1, BLOCK_BYTES // (w.shape[1] * w.element_size()))
        result = None
        for start in range(0, w.shape[0], rows):
            block = w[start:start + rows].clamp(min=0)
            den = F.linear(x, block, None if bias is None else bias[start:start + rows])
            part = self.stabilizer.divide(relevance[..., start:start + rows], den).matmul(block)
            result = part if result is None else result.add_(part)
        return result.mul_(x)
