"""The conservation recorder: a relevance tensor handed from one layer to the next is summed once."""

from __future__ import annotations

import torch
from torch import nn

import lrpcli
from lrpcli.engine import recorder as recorder_module
from lrpcli.engine.modules import Sum
from lrpcli.engine.recorder import Recorder, per_sample_sum


class Residual(nn.Module):
    """A chain with a skip connection, so that some relevance arrives by two paths (no hand-down)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.add = Sum()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.conv1(x))
        b = self.relu2(self.conv2(a))
        return self.fc(self.flat(self.pool(self.add(a, b))))


def _table(model: nn.Module, x: torch.Tensor, recorder: Recorder):
    comp = lrpcli.composites.get("epsilon_plus")
    with comp.context(model, recorder=recorder) as m:
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        seed = lrpcli.initial_relevance(out, torch.tensor([1, 3]))
        torch.autograd.grad(out, xi, seed)
        return recorder.table()


def test_handed_down_sums_equal_fresh_sums_and_are_reused(monkeypatch):
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    calls = []

    def counting(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return per_sample_sum(t)

    monkeypatch.setattr(recorder_module, "per_sample_sum", counting)
    layers, rules, r_in, r_out = _table(model, x, Recorder())
    reused = calls[:]

    calls.clear()
    monkeypatch.setattr(Recorder, "_sum", lambda self, relevance: counting(relevance))
    monkeypatch.setattr(recorder_module, "same_elements", lambda a, b: False)
    layers_fresh, rules_fresh, r_in_fresh, r_out_fresh = _table(model, x, Recorder())

    assert layers == layers_fresh and rules == rules_fresh and len(layers) >= 7
    assert torch.equal(r_in, r_in_fresh) and torch.equal(r_out, r_out_fresh)  # bit for bit
    assert torch.isfinite(r_out).all()
    assert len(calls) == 2 * len(layers) + 1  # every relevance_out and every input part (Sum has two) summed
    # handed down: every relevance_out but fc's (the seed) and relu1's (where the skip and conv2 paths meet); and
    # the pass-throughs (relu1, relu2, flatten) hand down their output relevance itself, summed once
    assert len(reused) == len(calls) - 6 - 3


def test_a_tensor_changed_in_place_is_summed_again():
    rec = Recorder()
    t = torch.ones(2, 3)
    rec._handed_down = [(t, t._version, per_sample_sum(t))]
    t.mul_(2)
    assert rec._sum(t).tolist() == [6.0, 6.0]
    other = torch.ones(2, 3)
    rec._handed_down = [(t, t._version, torch.tensor([-1.0, -1.0], dtype=torch.float64))]
    assert rec._sum(other).tolist() == [3.0, 3.0]  # not the same tensor: no reuse
    assert rec._sum(t).tolist() == [6.0, 6.0]  # the hand-down is used once at most
