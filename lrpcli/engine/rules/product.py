"""Rules for products of activations (AttnLRP, Achtibat et al., ICML 2024, Propositions 3.2 and 3.3).

``Product`` (AttnLRP's uniform rule, epsilon variant): an output that is a product of n factors (element-wise
a * b, or a matrix product A @ V, read as a sum of products followed by the Epsilon rule over the sum) gives
each factor the same share. For every factor k

    R_k = x_k * (d out / d x_k)^T (R / s(out)) / n

and since the product is linear in each factor, sum_k x_k d out / d x_k = n * out: conservative up to the
stabilizer. ``ConstantOperand`` treats one operand as a constant (CP-LRP, Ali et al., ICML 2022: the attention
weights are constants, so A @ V hands all relevance to V; the same holds for a gate x * sigmoid(g)); the other
operand gets the Epsilon rule on the linear map it goes through.
"""

from __future__ import annotations

import torch
from torch import nn

from lrpcli.engine.functional_modules import PRODUCTS
from lrpcli.engine.rules.base import Rule, check_number
from lrpcli.engine.rules.stabilizer import Stabilizer


class _OperandRule(Rule):
    needs_graph = True  # the module's own backward, once
    proportional_to_inputs = True

    def __init__(self, stabilizer: Stabilizer | float | None = None) -> None:
        self.stabilizer = Stabilizer.coerce(stabilizer)

    def _repr_parts(self) -> list[str]:
        parts = super()._repr_parts()
        if self.stabilizer != Stabilizer():
            parts.append(f"stabilizer={self.stabilizer.epsilon:g}/{self.stabilizer.mode}")
        return parts

    def check(self, module: nn.Module, name: str) -> None:
        if not isinstance(module, PRODUCTS):
            raise ValueError(f"{type(self).__name__} applies to products of activations (Product, MatMul, "
                             f"AttentionProduct, Gate); module {name!r} is {type(module).__name__}")


class Product(_OperandRule):
    """Uniform rule: each of the n factors gets 1/n of the relevance, split by contribution within it."""

    name = "product"

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ratio = self.stabilizer.divide(relevance, call.output)
        grads = call.native_vjp(ratio)
        n = len(call.inputs)
        return tuple(None if g is None else x * g / n for x, g in zip(call.inputs, grads))


class ConstantOperand(_OperandRule):
    """One operand is a constant: all relevance goes to the others by the Epsilon rule. ``constant`` is the
    operand's index, or -1 for the module's own choice (an AttentionProduct's attention weights, a Gate's gate)."""

    name = "constant_operand"
    shown = ("constant",)

    def __init__(self, constant: int = -1, stabilizer: Stabilizer | float | None = None) -> None:
        super().__init__(stabilizer)
        self.constant = int(check_number("ConstantOperand", "constant", constant, minimum=-1))

    def index(self, module: nn.Module) -> int:
        if self.constant >= 0:
            return self.constant
        return int(getattr(module, "constant_index", 1))

    def relevance(self, call, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        fixed = self.index(call.module)
        if fixed >= len(call.inputs):
            raise RuntimeError(f"lrpcli: ConstantOperand(constant={fixed}) on module {call.name!r} "
                               f"({type(call.module).__name__}), which has {len(call.inputs)} tensor inputs")
        ratio = self.stabilizer.divide(relevance, call.output)
        grads = call.native_vjp(ratio)
        return tuple(None if g is None or k == fixed else x * g
                     for k, (x, g) in enumerate(zip(call.inputs, grads)))
