"""ZBox: for inputs bounded by [low, high] (the first layer on pixels). Exactly conservative.

c_ij = x_i W_ji - l_i W+_ji - h_i W-_ji and R_i = sum_j c_ij R_j / s(sum_i c_ij); the bias never enters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrpcli.engine.layerops import forward, input_vjps
from lrpcli.engine.rules.base import ParamRule
from lrpcli.engine.rules.stabilizer import Stabilizer

Bound = float | Sequence[float] | torch.Tensor


def expand_bound(bound: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar, a per-channel vector (channel dim 1) or a tensor shaped like x or one sample, as a tensor
    broadcastable to x; per-channel and scalar bounds keep batch size 1 (they are the same for every sample)."""
    if not isinstance(bound, torch.Tensor):
        return torch.full((1,) + x.shape[1:], float(bound), dtype=x.dtype, device=x.device)
    b = bound.to(dtype=x.dtype, device=x.device)
    if b.dim() == 0:
        return b.expand((1,) + x.shape[1:])
    if b.dim() == 1 and x.dim() >= 2 and b.shape[0] == x.shape[1]:
        return b.view((1, -1) + (1,) * (x.dim() - 2)).expand((1,) + x.shape[1:])
    if b.shape == x.shape[1:]:
        return b.unsqueeze(0)
    if b.shape == x.shape:
        return b
    raise ValueError(f"ZBox: a bound of shape {tuple(b.shape)} does not fit an input of shape {tuple(x.shape)}")


def _as_bound(value: Bound, key: str) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return torch.tensor([float(v) for v in value])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"ZBox: {key} must be a number or a per-channel list, got {value!r}")
    return float(value)


class ZBox(ParamRule):
    """LRP-ZBox with lower bound ``low`` and upper bound ``high`` (scalars or per-channel)."""

    name = "zbox"
    shown = ("low", "high")
    ratio_of_output = True

    def __init__(self, low: Bound = -3.0, high: Bound = 3.0, stabilizer: Stabilizer | float | None = None,
                 zero_params: Sequence[str] = ()) -> None:
        self.low = _as_bound(low, "low")
        self.high = _as_bound(high, "high")
        if bool(torch.as_tensor(self.low > self.high).any()):
            raise ValueError(f"ZBox: low must not exceed high, got low={low!r}, high={high!r}")
        super().__init__(stabilizer, zero_params)

    def splits_over_batch(self, call) -> bool:
        # a bound given per sample (shaped like the whole input) cannot follow a slice of the batch
        return not any(isinstance(b, torch.Tensor) and b.shape == call.x.shape for b in (self.low, self.high))

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight, _ = call.params()
        x, z, m = call.x, call.output, call.module
        low, high = expand_bound(self.low, x), expand_bound(self.high, x)
        w_pos = call.memo("weight_pos", lambda: weight.clamp(min=0))
        ratio = self.stabilizer.divide(relevance, z - self._offset(call), rms=self.rms_of(call))
        full, pos = input_vjps(m, x, weight, w_pos, ratio, z)
        return (x * full - low * pos - high * (full - pos),)

    def denominators(self, call) -> tuple[torch.Tensor, ...]:
        return (call.output - self._offset(call),)

    def _offset(self, call) -> torch.Tensor:
        """The bounds' terms and the bias, l W+ + h W- + b: the denominator is z minus them. Computed at the
        bounds' batch size: 1 (and once for all slices of the batch) unless the bounds are given per sample."""
        (weight, bias), x, z, m = call.params(), call.x, call.output, call.module
        low, high = expand_bound(self.low, x), expand_bound(self.high, x)
        w_pos = call.memo("weight_pos", lambda: weight.clamp(min=0))

        def bound_terms() -> torch.Tensor:
            return forward(m, low, w_pos, bias, z) + forward(m, high, weight - w_pos, None, z)

        return call.memo("zbox_bounds", bound_terms) if low.shape[0] == high.shape[0] == 1 else bound_terms()
