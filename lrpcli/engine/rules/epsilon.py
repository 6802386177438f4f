"""Epsilon rule: R_i = x_i sum_j W_ji R_j / s_eps(z_j).

Costs one transposed operation (the same work as the plain input gradient) plus element-wise work: the
denominator is the output the forward already computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrpcli.engine.layerops import input_vjp
from lrpcli.engine.rules.base import ParamRule, check_number, times_input
from lrpcli.engine.rules.stabilizer import Stabilizer


class Epsilon(ParamRule):
    """LRP-epsilon; ``epsilon`` is the stabilizer's epsilon (its mode comes from ``stabilizer``)."""

    name = "epsilon"
    proportional_to_inputs = True
    shown = ("epsilon",)
    ratio_of_output = True

    def __init__(self, epsilon: float = 1e-6, stabilizer: Stabilizer | float | None = None,
                 zero_params: Sequence[str] = ()) -> None:
        self.epsilon = check_number("Epsilon", "epsilon", epsilon, strict=True)  # 0 divides by z = 0 (as config)
        mode = Stabilizer.coerce(stabilizer).mode
        super().__init__(Stabilizer(self.epsilon, mode), zero_params)

    def _repr_parts(self) -> list[str]:
        parts = [f"epsilon={self.epsilon:g}"]
        if self.stabilizer.mode != "sign":
            parts.append(f"mode={self.stabilizer.mode}")
        if self.zero_params:
            parts.append(f"zero_params={list(self.zero_params)}")
        return parts

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight, bias = call.params()
        z = call.output_without_bias(bias) if self.zero_bias else call.output
        # relu(z) (bias kept): z >= 0 wherever relevance arrives
        ratio = self.stabilizer.divide(relevance, z, nonnegative=call.output_rectified and not self.zero_bias,
                                       rms=self.rms_of(call))
        return (times_input(call.x, input_vjp(call.module, call.x, weight, ratio, z), call.into),)

    def denominators(self, call) -> tuple[torch.Tensor, ...]:
        return (call.output_without_bias(call.params()[1]) if self.zero_bias else call.output,)
