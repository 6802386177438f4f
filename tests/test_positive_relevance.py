"""Relevance known to vanish where z <= 0 below a recomputed ReLU (``LayerCall.positive_relevance``), in float64.

A layer whose rms stabilizer needs its whole output keeps z, and the ReLU above it is recomputed from z
(``relu_recompute``). When the layer above the ReLU has a rule proportional to its input, its relevance is zero
wherever relu(z) is, and the session notes that against z (``ZeroNotes.mark_rectified``): Gamma then skips the pass
that looks for relevance at outputs z < 0 and backprojects through W + gamma W+ at once. The flag must be set only
where that holds (a single proportional consumer) and the relevance must equal the plain path's either way.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine import layercall
from lrpcli.engine.composites.base import NameMap
from lrpcli.engine.modules import Sum
from lrpcli.engine.rules import Epsilon, Flat, Gamma, Norm, Pass, Stabilizer, plain

DT = torch.float64
pytestmark = pytest.mark.usefixtures('one_thread')


class Branches(nn.Module):
    """ReLU -> conv -> ReLU -> (one consumer, or two whose outputs are summed) -> head: the conv's input is known
    to be >= 0, where Gamma's one-operation path applies."""

    def __init__(self, two_consumers: bool) -> None:
        super().__init__()
        self.pre = nn.ReLU()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.upper = nn.Conv2d(6, 4, 3, padding=1)
        self.other = nn.Conv2d(6, 4, 1)
        self.two = two_consumers
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(self.pre(x)))
        out = self.upper(y)
        if self.two:
            out = out + self.other(y)
        else:
            out = out + self.other(torch.zeros_like(y))  # the same modules run either way
        return self.head(out)


def _run(model: nn.Module, upper_rule, monkeypatch, zero_params: tuple[str, ...] = ()
         ) -> tuple[dict[str, bool], torch.Tensor, torch.Tensor]:
    """(positive_relevance per hooked call in the fast backward, fast relevance, plain relevance)."""
    rms = Stabilizer(0.1, 'rms')
    composite = NameMap([('conv', Gamma(0.25, stabilizer=rms, zero_params=zero_params)), ('relu', Pass()),
                         ('pre', Pass()), ('head.0', Pass()), ('upper', upper_rule),
                         ('other', Gamma(0.5, stabilizer=rms)),
                         ('head.1', Epsilon(0.1, stabilizer=rms)), (Sum, Norm(rms))])
    flags: dict[str, bool] = {}
    relevance = layercall.LayerCall.relevance

    def spy(self, r: torch.Tensor):
        flags[self.name] = self.positive_relevance
        return relevance(self, r)

    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    monkeypatch.setattr(layercall.LayerCall, 'relevance', spy)
    fast = lrpcli.attribute(model, x, target=1, composite=composite, canonizers=['residual'])
    monkeypatch.undo()
    with plain():
        slow = lrpcli.attribute(model, x, target=1, composite=composite, canonizers=['residual'])
    return flags, fast, slow


@pytest.mark.parametrize('upper,two,expected', [
    ('gamma', False, True),     # one proportional consumer: known
    ('flat', False, False),     # Flat spreads relevance onto inputs that are 0: not known
    ('gamma', True, False),     # two consumers: the ReLU's relevance is their sum, a tensor no note is about
])
def test_flag_only_where_the_relevance_vanishes(upper, two, expected, monkeypatch):
    torch.manual_seed(0)
    model = Branches(two).to(DT).eval()
    rule = Gamma(0.5, stabilizer=Stabilizer(0.1, 'rms')) if upper == 'gamma' else Flat()
    flags, fast, slow = _run(model, rule, monkeypatch)
    assert flags['conv'] is expected
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    assert slow.abs().max() > 1e-3


def test_zeroed_bias_keeps_the_check(monkeypatch):
    """Under zero_params=['bias'] the rule's output is z - b, whose sign differs from z's where 0 < z < b: the
    relevance is still known to vanish where z <= 0, but not where z - b <= 0, so Gamma keeps its check."""
    torch.manual_seed(0)
    model = Branches(False).to(DT).eval()
    with torch.no_grad():
        model.conv.bias.fill_(0.5)  # many outputs with 0 < z < b
    flags, fast, slow = _run(model, Gamma(0.5, stabilizer=Stabilizer(0.1, 'rms')), monkeypatch, ('bias',))
    assert flags['conv'] is True
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    assert slow.abs().max() > 1e-3


def test_flat_above_puts_relevance_where_z_is_negative(monkeypatch):
    """The case the flag must not claim: with Flat above, the layer below gets relevance at outputs z < 0, and the
    fast path (which then checks) still equals the plain path."""
    torch.manual_seed(0)
    model = Branches(False).to(DT).eval()
    seen: list[bool] = []
    relevance = layercall.LayerCall.relevance

    def spy(self, r: torch.Tensor):
        if self.name == 'conv':
            seen.append(bool(((r != 0) & (self.output < 0)).any()))
        return relevance(self, r)

    monkeypatch.setattr(layercall.LayerCall, 'relevance', spy)
    rms = Stabilizer(0.1, 'rms')
    composite = NameMap([('conv', Gamma(0.25, stabilizer=rms)), ('relu', Pass()), ('pre', Pass()), ('head.0', Pass()),
                         ('upper', Flat()), ('other', Flat()), ('head.1', Epsilon(0.1)), (Sum, Norm(rms))])
    lrpcli.attribute(model, torch.randn(2, 3, 5, 5, dtype=DT), target=1, composite=composite, canonizers=['residual'])
    assert seen == [True]
