"""The rms stabilizer on layers followed by a ReLU, in float64.

Such a layer keeps one activation, in one of two ways: it keeps its whole output z while the ReLU's output leaves
the graph and is recomputed from z where it is saved (``whole``, ``LayerCall.keeps_whole_output``), or, where
saved-tensor hooks cannot be used (a caller's own are in effect), it keeps the ReLU's output and the per-sample rms
of each of its rule's denominators, taken in the forward while z is whole (``rectified``, ``LayerCall.rectify``).
Each rule that forms its denominators from the output (Epsilon, Gamma, AlphaBeta, ZBox) must give the relevance
of the plain, formula-shaped path, which forms s(den) from the whole z, to 1e-12 either way: on every layer type,
after inputs of both signs or after a ReLU, with the ReLU in place or not, with relevance only where the ReLU
passes or everywhere (z recomputed), sliced over the batch, and without a ReLU (neither way applies).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpcli
from lrpcli.engine import hooks, layercall
from lrpcli.engine.composites.base import LayerMap
from lrpcli.engine.rules import AlphaBeta, Epsilon, Gamma, Pass, Stabilizer, ZBox, plain
from tests.test_plain_path import _layer  # layers with exact zeros in W, as the plain-path tests build them

DT = torch.float64
ATOL = 1e-12

pytestmark = pytest.mark.usefixtures('one_thread')


def _rms(eps: float) -> Stabilizer:
    return Stabilizer(eps, 'rms')


RULES = {
    'epsilon': lambda: Epsilon(0.1, stabilizer=_rms(0.1)),
    'epsilon_zb': lambda: Epsilon(0.25, stabilizer=_rms(0.25), zero_params=['bias']),
    'gamma': lambda: Gamma(0.25, stabilizer=_rms(0.1)),
    'gamma_zb': lambda: Gamma(1.0, stabilizer=_rms(0.1), zero_params=['bias']),
    'alphabeta': lambda: AlphaBeta(2, 1, stabilizer=_rms(0.1)),
    'alphabeta_1_0': lambda: AlphaBeta(1, 0, stabilizer=_rms(0.1)),
    'zbox': lambda: ZBox(-3.0, 3.0, stabilizer=_rms(0.1)),
}

LAYERS = [
    ('linear', lambda: nn.Linear(6, 5), (6,)),
    ('conv1d', lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 9)),
    ('conv2d', lambda: nn.Conv2d(3, 4, (2, 3), padding=(1, 0)), (3, 5, 6)),
    ('conv2d_groups', lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2), (4, 7, 7)),
    ('conv2d_depthwise', lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (3, 5, 5)),
    ('conv2d_pointwise', lambda: nn.Conv2d(3, 4, 1), (3, 16, 16)),
    ('conv3d', lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 3, 4, 3)),
    ('convT1d_groups', lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 5)),
    ('convT2d', lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 4, 4)),
    ('convT3d', lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1), (2, 3, 2, 3)),
]

# (id, inputs of both signs, the ReLU after the layer (None: none), relevance only where it passes, sliced)
SETTINGS = [
    ('mixed_relu', True, 'relu', True, False),
    ('after_relu', False, 'relu', True, False),
    ('after_relu_inplace', False, 'inplace', True, False),
    ('relevance_everywhere', False, 'relu', False, False),
    ('sliced', False, 'inplace', True, True),
    ('no_relu', False, None, False, False),
]


def _spy_routes(monkeypatch) -> list[tuple[str, str]]:
    """Record each call that kept relu(z) and the rms of its denominators (``rectified``), and each backward of a
    call that kept its whole output (``whole``)."""
    seen: list[tuple[str, str]] = []
    rectify, whole = layercall.LayerCall.rectify, hooks.Session._whole_output_producer

    def spy_rectify(self, rectified: torch.Tensor) -> None:
        rectify(self, rectified)
        if self.rectified and self.rms is not None:
            seen.append((self.name, 'rectified'))

    def spy_whole(self, z: torch.Tensor, output: torch.Tensor) -> layercall.LayerCall | None:
        call = whole(self, z, output)
        if call is not None:
            seen.append((call.name, 'whole'))
        return call

    monkeypatch.setattr(layercall.LayerCall, 'rectify', spy_rectify)
    monkeypatch.setattr(hooks.Session, '_whole_output_producer', spy_whole)
    return seen


def _route(route: str) -> contextlib.AbstractContextManager:
    """``rectified``: a caller's saved-tensor hooks are in effect, which the session does not shadow."""
    if route == 'whole':
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _fast_and_plain(model: nn.Module, x: torch.Tensor, composite, target, route: str = 'whole',
                    **kw) -> tuple[torch.Tensor, ...]:
    with _route(route):
        fast = lrpcli.attribute(model, x, target=target, composite=composite, **kw)
    with plain():
        slow = lrpcli.attribute(model, x, target=target, composite=composite, **kw)
    return fast, slow


def _expected(name: str, route: str, masked: bool, rule) -> tuple[str, str]:
    if route == 'rectified' or not rule.denominators_take_a_forward:  # Epsilon, ZBox: the rms costs one pass
        return name, 'rectified'
    return name, 'whole'


@pytest.mark.parametrize('route', ['whole', 'rectified'])
@pytest.mark.parametrize('setting,mixed,relu,masked,sliced', SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize('layer_id,factory,shape', LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize('rule_id', list(RULES))
def test_rms_before_a_relu_equals_the_formula(rule_id, layer_id, factory, shape, setting, mixed, relu, masked, sliced,
                                              route, monkeypatch):
    if sliced:  # the forward's rms and the backward over slices of the batch
        monkeypatch.setattr(layercall, 'CHUNK_BYTES', 64)
    layer = _layer(factory, seed=len(layer_id))
    after = [] if relu is None else [nn.ReLU(inplace=relu == 'inplace')]
    model = nn.Sequential(*([] if mixed else [nn.ReLU()]), layer, *after)
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(7), dtype=DT)
    composite = LayerMap([(type(layer), RULES[rule_id]()), (nn.ReLU, Pass())])

    def target(out: torch.Tensor) -> torch.Tensor:  # the same for both paths
        upper = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=DT)
        return upper * (out > 0) if masked else upper

    seen = _spy_routes(monkeypatch)
    fast, slow = _fast_and_plain(model, x, composite, target, route)
    rule = RULES[rule_id]()
    assert seen == ([] if relu is None else [_expected('0' if mixed else '1', route, masked, rule)])  # fast only
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    assert slow.abs().max() > 1e-3  # something was compared


class _FunctionalReLU(nn.Module):
    """A convolution followed by ``F.relu(..., inplace=True)``: the functional canonizer makes the ReLU a module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x), inplace=True))


@pytest.mark.parametrize('route', ['whole', 'rectified'])
@pytest.mark.parametrize('rule_id', list(RULES))
def test_functional_inplace_relu(rule_id, route, monkeypatch):
    """An in-place functional ReLU runs as a module (out of place) under the functional canonizer: the
    convolution below it keeps z, or relu(z) and its denominators' rms taken before the ReLU ran."""
    torch.manual_seed(2)
    model = _FunctionalReLU().to(DT)
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    composite = LayerMap([(nn.Conv2d, RULES[rule_id]()), (nn.ReLU, Pass())])
    seen = _spy_routes(monkeypatch)
    fast, slow = _fast_and_plain(model, x, composite, 1, route, canonizers=['functional'])
    route = route if RULES[rule_id]().denominators_take_a_forward else 'rectified'
    assert ('conv', route) in [(name, how.split(',')[0]) for name, how in seen]
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    assert slow.abs().max() > 1e-3


def test_zero_epsilon_keeps_the_output():
    """epsilon 0: a denominator formed from relu(z) may be 0 where the true one is not (0 / 0 would be NaN where
    the relevance is 0), so the layer keeps z, as in the sign mode."""
    assert not Gamma(0.25, stabilizer=_rms(0.0)).tolerates_rectified_output()
    assert not Gamma(0.25, stabilizer=Stabilizer(0.0)).tolerates_rectified_output()
    for rule in RULES.values():
        assert rule().tolerates_rectified_output() and rule().rms_at_forward()
    assert not Gamma(0.25).rms_at_forward()  # the sign mode keeps nothing besides relu(z)


def test_second_order_takes_the_rms_from_the_recomputed_output():
    """With a graph being recorded the rms is a function of the denominator: the kept one is not used, z is
    recomputed and the relevance's gradient equals the plain path's."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).to(DT)
    composite = LayerMap([(nn.Conv2d, Gamma(0.25, stabilizer=_rms(0.1))), (nn.Linear, Epsilon(0.1)),
                          ((nn.ReLU, nn.Flatten), Pass())])
    x = torch.randn(2, 2, 4, 4, dtype=DT)

    def second_order() -> torch.Tensor:
        with composite.context(model) as m:
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            (r,) = torch.autograd.grad(out, xi, lrpcli.initial_relevance(out, 0), create_graph=True)
            with lrpcli.rules_off(model):
                (g,) = torch.autograd.grad(r.pow(2).sum(), xi)
        return torch.cat([r.detach().flatten(), g.flatten()])

    fast = second_order()
    with plain():
        slow = second_order()
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    assert slow.abs().max() > 1e-3


def test_divide_with_a_given_rms():
    """``Stabilizer.divide(..., rms=)`` with the denominator's own rms equals the call that takes it, and the
    non-negative shortcut equals both where den >= 0."""
    torch.manual_seed(1)
    den, num = torch.randn(3, 4, 5, dtype=DT), torch.randn(3, 4, 5, dtype=DT)
    stab = _rms(0.5)
    want = num / stab(den)
    torch.testing.assert_close(stab.divide(num, den, rms=Stabilizer.rms(den)), want, atol=1e-14, rtol=0)
    torch.testing.assert_close(stab.divide(num, den), want, atol=1e-14, rtol=0)
    positive = den.abs()
    torch.testing.assert_close(stab.divide(num, positive, nonnegative=True, rms=Stabilizer.rms(positive)),
                               num / stab(positive), atol=1e-14, rtol=0)
    zero = torch.zeros(2, 3, dtype=DT)
    assert Stabilizer.rms(zero).flatten().tolist() == [1.0, 1.0]  # an all-zero sample: eps itself


class _AddedInPlace(nn.Module):
    """``z += x`` between a convolution and its ReLU: the ReLU's input is z's tensor, changed in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        z += x
        return self.head(self.relu(z)).flatten(1)


@pytest.mark.parametrize('stabilizer', [Stabilizer(1e-6), _rms(1e-6)], ids=['sign', 'rms'])
def test_output_changed_in_place_before_the_relu_is_refused(stabilizer):
    """The convolution does not keep relu(z + x) as its output (which would give wrong relevance silently): it
    keeps z, and the backward refuses the change."""
    torch.manual_seed(0)
    model = _AddedInPlace().to(DT)
    composite = LayerMap([(nn.Conv2d, Gamma(0.25, stabilizer=stabilizer)), (nn.ReLU, Pass())])
    with pytest.raises(RuntimeError, match="'conv' .* was modified in place"):
        lrpcli.attribute(model, torch.randn(2, 2, 5, 5, dtype=DT), 0, composite=composite)


def test_whole_output_route_gives_what_the_rectified_route_gives(monkeypatch):
    """Gamma keeps z whole and the ReLU outputs are recomputed (a max pool's saved input among them): the
    relevance, the plain gradient under rules_off, a retained graph's second backward and a second-order gradient
    through the relevance equal those of the rectified route and the plain path."""
    from lrpcli.engine.rules import Gradient

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 2)).to(DT)
    composite = LayerMap([(nn.Conv2d, Gamma(0.25, stabilizer=_rms(0.1))),
                          (nn.Linear, Epsilon(0.1, stabilizer=_rms(0.1))),
                          ((nn.ReLU, nn.Flatten), Pass()), (nn.MaxPool2d, Gradient())])
    x = torch.randn(2, 2, 4, 4, dtype=DT)

    def everything() -> list[torch.Tensor]:
        xr = x.clone().requires_grad_(True)
        with composite.context(model) as m:
            out = m(xr)
            with lrpcli.rules_off(model):
                results = list(torch.autograd.grad(out[:, 0].sum(), xr, retain_graph=True))
            seed = lrpcli.initial_relevance(out, 1)
            results += torch.autograd.grad(out, xr, seed, retain_graph=True)
            results += torch.autograd.grad(out, xr, seed)
        relevance = lrpcli.attribute(model, xr, 1, composite=composite, create_graph=True)
        return results + list(torch.autograd.grad((relevance ** 2).sum(), [xr, *model.parameters()]))

    seen = _spy_routes(monkeypatch)
    got = everything()
    assert ('0', 'whole') in seen and ('2', 'whole') in seen
    with monkeypatch.context() as mp:
        mp.setattr(hooks.Session, '_whole_output_producer', lambda self, z, output: None)
        rectified = everything()
    with plain():
        slow = everything()
    assert len(got) == len(rectified) == len(slow) == 3 + 1 + 8
    for a, b, c in zip(got, rectified, slow):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        torch.testing.assert_close(a, c, atol=ATOL, rtol=0)
        assert c.abs().max() > 1e-6
