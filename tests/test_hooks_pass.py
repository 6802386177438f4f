"""Pass on an activation or a gate runs without a LayerCall (``PassFunction``): the same relevance as the
recorded path, the plain gradient when the rules are off, and Pass's own reshape and refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine.composites import LayerMap
from lrpcli.engine.layercall import LayerCall
from lrpcli.engine.modules import Gate
from lrpcli.engine.recorder import Recorder
from lrpcli.engine.rules import Epsilon, Norm, Pass

pytestmark = pytest.mark.usefixtures("float64")


class Block(nn.Module):
    """conv -> SiLU -> squeeze-excitation gate -> conv, with a reshaping module given Pass."""

    def __init__(self, squeeze: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.SiLU()
        self.pool, self.fc, self.sig, self.gate = nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid(), Gate()
        self.squeeze = squeeze or nn.Unflatten(1, (4, 36))
        self.conv2 = nn.Conv1d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        g = self.gate(a, self.sig(self.fc(self.pool(a))))
        return self.conv2(self.squeeze(g.flatten(1))).sum(2)


COMPOSITE = LayerMap([((nn.Conv2d, nn.Conv1d), Epsilon()), (nn.AdaptiveAvgPool2d, Norm()),
                      ((nn.SiLU, nn.Sigmoid, Gate, nn.Unflatten, nn.Flatten), Pass())])


def _relevance(model: nn.Module, x: torch.Tensor, recorder: Recorder | None = None, off: bool = False):
    with COMPOSITE.context(model, recorder=recorder) as m:
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        nodes = {type(out.grad_fn).__name__}
        node = out.grad_fn
        while node is not None and node.next_functions:  # the graph's node types, along the first edges
            nodes.add(type(node).__name__)
            node = node.next_functions[0][0]
        if off:
            with lrpcli.rules_off(model):
                return torch.autograd.grad(out, xi, torch.ones_like(out))[0], nodes
        return torch.autograd.grad(out, xi, torch.ones_like(out))[0], nodes


def test_pass_without_record_gives_the_recorded_relevance():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 3, 6, 6)
    light, nodes = _relevance(model, x)
    recorded, recorded_nodes = _relevance(model, x, Recorder())
    assert "PassFunctionBackward" in nodes and "PassFunctionBackward" not in recorded_nodes
    assert torch.equal(light, recorded)
    assert light.abs().sum() > 0


def test_rules_off_give_the_plain_gradient():
    torch.manual_seed(1)
    model, x = Block(), torch.randn(2, 3, 6, 6)
    got, _ = _relevance(model, x, off=True)
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (expected,) = torch.autograd.grad(out, xi, torch.ones_like(out))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class Halve(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], 4, 36)[:, :, :18].reshape(x.shape[0], 4, 18)


def test_pass_on_a_module_that_changes_the_size_still_refuses():
    model, x = Block(squeeze=Halve()), torch.randn(2, 3, 6, 6)
    comp = LayerMap([((nn.Conv2d, nn.Conv1d), Epsilon()), (nn.AdaptiveAvgPool2d, Norm()),
                     ((nn.SiLU, nn.Sigmoid, Gate, Halve), Pass())])
    with comp.context(model) as m:
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        with pytest.raises(RuntimeError, match=r"Pass on module 'squeeze' \(Halve\) needs input and output of the "
                                               r"same size, got \(2, 144\) -> \(2, 4, 18\)"):
            torch.autograd.grad(out, xi, torch.ones_like(out))


def test_relu_and_flatten_keep_their_record():
    """A ReLU's and a Flatten's calls are what ``known_nonnegative`` and ``rectify`` read: they keep LayerCalls."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    comp = LayerMap([((nn.Conv2d, nn.Linear), Epsilon()), ((nn.ReLU, nn.Flatten), Pass())])
    with comp.context(model) as m:
        out = m(torch.randn(1, 3, 6, 6, requires_grad=True))
        flat = out.grad_fn.next_functions  # the Linear's own node is skipped: its RuleFunction is out's grad_fn
        assert isinstance(out.grad_fn.call, LayerCall)
        fed = [e[0] for e in flat if e[0] is not None]
        assert any(isinstance(getattr(n, "call", None), LayerCall) and isinstance(n.call.module, nn.Flatten)
                   for n in fed)
