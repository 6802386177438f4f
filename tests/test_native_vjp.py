"""LayerCall.native_vjp calls a one-operation module's autograd node directly: the very bits autograd.grad gives,
and autograd.grad wherever the node does not take the inputs one edge each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpcli.engine import layercall
from lrpcli.engine.layercall import LayerCall
from lrpcli.engine.modules import Gate
from lrpcli.engine.rules import Norm


class Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2.0).mean((2, 3), keepdim=True)  # two operations: the output's node does not take x


class Square(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y


def _call(module: nn.Module, *inputs: torch.Tensor) -> LayerCall:
    return LayerCall(object(), module, "m", "m", Norm(), inputs, module(*inputs), reads=("inputs", "output"))


def _reference(call: LayerCall, v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    wanted = [t for t in call.inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(call.output, wanted, v, retain_graph=True))
    return tuple(next(grads) if t.requires_grad else None for t in call.inputs)


def _leaf(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64, requires_grad=True) * 1.0)  # a non-leaf, as in a model


CASES = {
    "adaptive mean": (nn.AdaptiveAvgPool2d(1), lambda: (_leaf(2, 3, 5, 5),), True),
    "avg pool": (nn.AvgPool2d(3, 2, 1), lambda: (_leaf(2, 3, 6, 6),), True),
    "gate": (Gate(), lambda: (_leaf(2, 3, 4, 4), _leaf(2, 3, 4, 4)), True),
    "broadcast gate": (Gate(), lambda: (_leaf(2, 3, 4, 4), _leaf(2, 3, 1, 1)), True),
    "one input without grad": (Gate(), lambda: (_leaf(2, 3, 4, 4), torch.rand(2, 3, 1, 1, dtype=torch.float64)),
                               True),
    "same tensor twice": (Square(), lambda: (lambda x: (x, x))(_leaf(2, 3)), False),
    "two operations": (Twice(), lambda: (_leaf(2, 3, 4, 4),), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_native_vjp_matches_autograd_bit_for_bit(case, monkeypatch):
    torch.manual_seed(0)
    module, make, direct = CASES[case]
    call = _call(module, *make())
    used = []
    original = layercall._single_node
    monkeypatch.setattr(layercall, "_single_node", lambda o, i: used.append(original(o, i)) or used[-1])
    v = torch.randn_like(call.output)
    with torch.no_grad():
        got = call.native_vjp(v)
    expected = _reference(call, v)
    assert (used[-1] is not None) == direct
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert torch.equal(g, e)


def test_native_vjp_under_grad_mode_keeps_the_graph():
    x = _leaf(1, 2, 3, 3)
    call = _call(nn.AdaptiveAvgPool2d(1), x)
    v = torch.ones(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    (g,) = call.native_vjp(v)
    assert g.requires_grad  # create_graph: the vjp is differentiable in v
    (dv,) = torch.autograd.grad(g.sum(), v)
    assert torch.equal(dv, torch.ones_like(v))
