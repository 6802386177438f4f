"""The sign-split rules' fast path on grouped convolutions (depthwise included), in float64.

Gamma, AlphaBeta and ZPlus run grouped convolutions through ``layerops.pair_vjp`` (the stacked pair as one
transposed convolution with twice the groups) for inputs >= 0 and for inputs of both signs (after SiLU or
Hardswish). Each case is checked against the dense reference of tests/reference_lrp.py and against the plain,
formula-shaped path, and the fast path is checked to be the one taken.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine import layerops
from lrpcli.engine.composites.base import LayerMap
from lrpcli.engine.rules import AlphaBeta, Gamma, Pass, Stabilizer, ZPlus, plain
from lrpcli.engine.rules.signsplit import SignSplit

try:
    from tests.reference_lrp import RefRule, reference_lrp, stabilize
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference_lrp import RefRule, reference_lrp, stabilize

DT = torch.float64
# the dense reference sums in another order; denominators are kept >= 1e-2 in size (EPS and redrawn data), so
# rounding is amplified at most a hundredfold from float64's 1e-16
ATOL = RTOL = 1e-14
EPS = 0.05

pytestmark = pytest.mark.usefixtures('one_thread')

# (id, factory, per-sample input shape, fast: takes the fused path)
LAYERS = [
    ('depthwise', lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 6, 6), True),
    ('depthwise_stride2', lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (4, 7, 7), True),
    ('depthwise_dilated', lambda: nn.Conv2d(3, 3, (3, 2), padding=(2, 1), dilation=2, groups=3), (3, 6, 5), True),
    ('depthwise_multiplier2', lambda: nn.Conv2d(3, 6, 3, stride=2, groups=3), (3, 7, 6), True),
    ('depthwise1d', lambda: nn.Conv1d(3, 3, 5, stride=2, padding=2, groups=3), (3, 11), True),
    ('groups2', lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (4, 7, 7), True),
    ('groups4', lambda: nn.Conv2d(8, 4, (2, 3), padding=(1, 0), groups=4), (8, 5, 6), True),
    ('groups2_3d', lambda: nn.Conv3d(4, 2, 2, stride=(1, 2, 1), padding=1, groups=2), (4, 3, 4, 3), True),
    ('groups1', lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), (3, 7, 7), True),
    # padding given by name or a non-zero mode: the general path
    ('depthwise_same', lambda: nn.Conv2d(3, 3, 3, padding='same', groups=3), (3, 5, 5), False),
    ('depthwise_reflect', lambda: nn.Conv2d(3, 3, 3, padding=1, padding_mode='reflect', groups=3), (3, 5, 5), False),
]

# (id, engine rule, reference rule)
RULES = [
    ('gamma_0.25', lambda: Gamma(0.25, stabilizer=EPS), RefRule('gamma', gamma=0.25, eps=EPS)),
    ('gamma_1_zb', lambda: Gamma(1.0, stabilizer=EPS, zero_params=['bias']),
     RefRule('gamma', gamma=1.0, eps=EPS, zero_bias=True)),
    ('gamma_rms', lambda: Gamma(0.25, stabilizer=Stabilizer(0.1, 'rms')),
     RefRule('gamma', gamma=0.25, eps=0.1, mode='rms')),
    ('gamma_clip', lambda: Gamma(0.25, stabilizer=Stabilizer(0.5, 'clip')),
     RefRule('gamma', gamma=0.25, eps=0.5, mode='clip')),
    ('alphabeta_2_1', lambda: AlphaBeta(2, 1, stabilizer=EPS), RefRule('alphabeta', alpha=2.0, beta=1.0, eps=EPS)),
    ('alphabeta_3_2_zb', lambda: AlphaBeta(3, 2, stabilizer=EPS, zero_params=['bias']),
     RefRule('alphabeta', alpha=3.0, beta=2.0, eps=EPS, zero_bias=True)),
    ('alphabeta_rms', lambda: AlphaBeta(2, 1, stabilizer=Stabilizer(0.1, 'rms')),
     RefRule('alphabeta', alpha=2.0, beta=1.0, eps=0.1, mode='rms')),
    ('zplus', lambda: ZPlus(stabilizer=EPS), RefRule('zplus', eps=EPS)),
    ('zplus_rms', lambda: ZPlus(stabilizer=Stabilizer(0.1, 'rms')), RefRule('zplus', eps=0.1, mode='rms')),
]
FUSED = ('gamma', 'alphabeta')  # rules with a fused path (ZPlus needs one transposed operation anyway)


def _layer(factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = factory().to(DT)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=g, dtype=DT)
        w[torch.rand(w.shape, generator=g) < 0.1] = 0.0  # exact zeros: W+ = W- = 0
        layer.weight.copy_(w)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=DT) * 0.5)
    return layer


def _data(layer: nn.Module, shape: tuple[int, ...], ref_rule: RefRule, nonnegative: bool, seed: int):
    """(x, upper, reference), redrawn while a reference denominator or output comes within 1e-2 of zero."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        x = torch.randn((2, *shape), generator=g, dtype=DT)
        x = x.clamp(min=0) if nonnegative else x
        with torch.no_grad():
            out = layer(x)
        upper = torch.randn(out.shape, generator=g, dtype=DT)
        ref, dens = reference_lrp(layer, x, upper, ref_rule)
        small = [d.abs()[d != 0].min().item() for d in dens + [out] if (d != 0).any()]
        if min(small) > 1e-3:
            return x, upper, ref
    raise AssertionError('could not draw well-conditioned data')


class _Spy:
    """Counts the fused path's transposed operations, Gamma's mixed-sign back-projections (by x and |x|) and the general
    path's back-projections."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pair = self.general = self.shared = 0
        pair_vjp, backproject, shared = layerops.pair_vjp, SignSplit.backproject, SignSplit.backproject_magnitude

        def counted_pair(*args, **kwargs):
            self.pair += 1
            return pair_vjp(*args, **kwargs)

        def counted_general(split, *args, **kwargs):
            self.general += 1
            return backproject(split, *args, **kwargs)

        def counted_shared(split, *args, **kwargs):
            self.shared += 1
            return shared(split, *args, **kwargs)

        monkeypatch.setattr(layerops, 'pair_vjp', counted_pair)
        monkeypatch.setattr(SignSplit, 'backproject_magnitude', counted_shared)
        monkeypatch.setattr(SignSplit, 'backproject', counted_general)


@pytest.mark.parametrize('signs', ['mixed', 'nonnegative'])
@pytest.mark.parametrize('rule_id,engine,ref_rule', RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize('layer_id,factory,shape,fast', LAYERS, ids=[c[0] for c in LAYERS])
def test_matches_reference(layer_id, factory, shape, fast, rule_id, engine, ref_rule, signs, monkeypatch):
    """The engine against the dense reference, two seeds; the fused path taken where the layer allows it."""
    spy = _Spy(monkeypatch)
    for seed in (0, 1):
        layer = _layer(factory, seed)
        x, upper, ref = _data(layer, shape, ref_rule, signs == 'nonnegative', seed)
        # x >= 0 behind a ReLU (an identity on it, under Pass): the engine then knows the sign without a pass
        model = nn.Sequential(nn.ReLU(), layer) if signs == 'nonnegative' else nn.Sequential(layer)
        composite = LayerMap([(type(layer), engine()), (nn.ReLU, Pass())])
        got = lrpcli.attribute(model, x.clone(), target=upper.clone(), composite=composite)
        assert got.dtype == DT and got.shape == x.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=lambda m, s=seed: f'seed {s}: {m}')
    if not (fast and rule_id.startswith(FUSED)):
        assert (spy.pair, spy.general, spy.shared) == (0, 2, 0)
    elif signs == 'nonnegative':  # Gamma with groups: two transposed operations over the layer's own groups
        pair = 0 if rule_id.startswith('gamma') and layer_id != 'groups1' else 2
        assert (spy.pair, spy.general, spy.shared) == (pair, 0, 0)
    elif rule_id.startswith('gamma'):  # x and |x| back-projections, with or without groups
        assert (spy.pair, spy.general, spy.shared) == (0, 0, 2)
    else:  # with groups, one pair_vjp for x+ and one for x-; without, x+ and x- stacked into one block call
        assert (spy.pair, spy.general, spy.shared) == ((0, 0, 0) if layer_id == 'groups1' else (4, 0, 0))


@pytest.mark.parametrize('rule_id,engine,ref_rule', RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize('layer_id,factory,shape,fast', LAYERS, ids=[c[0] for c in LAYERS])
def test_fast_equals_plain_after_relu(layer_id, factory, shape, fast, rule_id, engine, ref_rule):
    """ReLU, layer, ReLU with relevance only where the last ReLU passes (Gamma's positive-output path) and with
    relevance everywhere, batch of 3: the fast path against the formula-shaped twin."""
    layer = _layer(factory, len(layer_id))
    model = nn.Sequential(nn.ReLU(), layer, nn.ReLU())
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(7), dtype=DT)
    composite = LayerMap([(type(layer), engine()), (nn.ReLU, Pass())])
    for rectified in (True, False):
        def target(out: torch.Tensor, rectified: bool = rectified) -> torch.Tensor:
            upper = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=DT)
            return upper * (out > 0) if rectified else upper

        fast_result = lrpcli.attribute(model, x, target=target, composite=composite)
        with plain():
            slow = lrpcli.attribute(model, x, target=target, composite=composite)
        torch.testing.assert_close(fast_result, slow, atol=1e-12, rtol=0)
        assert slow.abs().max() > 1e-3


def test_pair_vjp_is_the_sum_of_two_transposed_convolutions():
    """pair_vjp on a depthwise layer equals first^T a + second^T b taken by autograd, to rounding."""
    torch.manual_seed(5)
    layer = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6).to(DT)
    x = torch.randn(2, 6, 9, 9, dtype=DT)
    z = layer(x).detach()
    first, second = torch.randn_like(layer.weight), torch.randn_like(layer.weight)
    a, b = torch.randn_like(z), torch.randn_like(z)
    got = layerops.pair_vjp(layer, x, layerops.stack_pair(layer, first, second), torch.cat([a, b], dim=1), z)
    xi = x.clone().requires_grad_(True)
    out = layer._conv_forward(xi, first, None) * a + layer._conv_forward(xi, second, None) * b
    (expected,) = torch.autograd.grad(out.sum(), xi)
    assert got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize('shape', [(3, 4, 5, 6), (2, 7), (5,)], ids=['conv', 'dense', 'one_dim'])
def test_fused_rms_divide_matches_the_reference_stabilizer(shape):
    """The first-order rms division (one norm, copysign) against the reference's stabilizer sample by sample:
    with exact zeros (sign(0) = +1), an all-zero sample (eps itself), into a strided half of a pair buffer."""
    g = torch.Generator().manual_seed(3)
    den = torch.randn(shape, generator=g, dtype=DT)
    den.view(-1)[::4] = 0.0
    if len(shape) > 1:
        den[1] = 0.0
    numerator = torch.randn(shape, generator=g, dtype=DT)
    buf = torch.empty((shape[0], 2 * shape[1], *shape[2:]) if len(shape) > 1 else (2 * shape[0],), dtype=DT)
    out = buf.chunk(2, dim=1 if len(shape) > 1 else 0)[1]
    with torch.no_grad():
        got = Stabilizer(0.1, 'rms').divide(numerator, den, out=out)
    assert got.data_ptr() == out.data_ptr()
    samples = zip(numerator, den) if len(shape) > 1 else [(numerator, den)]
    expected = torch.stack([n / stabilize(d, 0.1, 'rms') for n, d in samples]).reshape(shape)
    torch.testing.assert_close(got, expected, atol=1e-14, rtol=1e-14)
    if len(shape) > 1:  # the all-zero sample divides by eps itself
        torch.testing.assert_close(got[1], numerator[1] / 0.1, atol=0, rtol=1e-15)


@pytest.mark.parametrize('rule_id', ['gamma_0.25', 'gamma_rms', 'alphabeta_2_1'])
@pytest.mark.parametrize('first', [True, False], ids=['mixed', 'after_relu'])
def test_channels_last_depthwise_equals_plain(rule_id, first):
    """A channels-last depthwise layer keeps its layout through pair_vjp; the result equals the plain twin's."""
    engine = dict((r[0], r[1]) for r in RULES)[rule_id]
    layer = _layer(lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), 2)
    model = nn.Sequential(layer) if first else nn.Sequential(nn.ReLU(), layer)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn((2, 4, 7, 7), generator=torch.Generator().manual_seed(5), dtype=DT)
    x = x.to(memory_format=torch.channels_last)
    composite = LayerMap([(nn.Conv2d, engine()), (nn.ReLU, Pass())])
    fast = lrpcli.attribute(model, x, target=None, composite=composite)
    with plain():
        slow = lrpcli.attribute(model, x, target=None, composite=composite)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    assert slow.abs().max() > 1e-3


@pytest.mark.parametrize('layer_id', ['depthwise', 'groups1'])
def test_gamma_below_a_relu_takes_one_transposed_operation(layer_id, monkeypatch):
    """x >= 0 and relevance only where z >= 0 (a ReLU above), under the rms stabilizer (no rectified output):
    Gamma's pair of transposed operations collapses to one through W + gamma W+, equal to the plain path."""
    from lrpcli.engine.rules import gamma

    factory, shape = next((f, s) for i, f, s, _ in LAYERS if i == layer_id)
    layer = _layer(factory, 3)
    model = nn.Sequential(nn.ReLU(), layer, nn.ReLU())
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(7), dtype=DT)
    composite = LayerMap([(type(layer), Gamma(0.25, stabilizer=Stabilizer(0.1, 'rms'))), (nn.ReLU, Pass())])

    def target(out: torch.Tensor) -> torch.Tensor:
        return torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=DT) * (out > 0)

    calls = []
    vjp = gamma.input_vjp
    monkeypatch.setattr(gamma, 'input_vjp', lambda *args: calls.append(1) or vjp(*args))
    fast = lrpcli.attribute(model, x, target=target, composite=composite)
    assert len(calls) == 1
    with plain():
        slow = lrpcli.attribute(model, x, target=target, composite=composite)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    assert slow.abs().max() > 1e-3


ALPHA_BETA = [r for r in RULES if r[0].startswith('alphabeta')]


@pytest.mark.parametrize('rule_id,engine,ref_rule', ALPHA_BETA, ids=[r[0] for r in ALPHA_BETA])
@pytest.mark.parametrize('layer_id,factory,shape,fast', [c for c in LAYERS if c[3]], ids=[c[0] for c in LAYERS if c[3]])
def test_alphabeta_float32_by_magnitude(layer_id, factory, shape, fast, rule_id, engine, ref_rule, monkeypatch):
    """AlphaBeta on inputs of both signs in float32: the x and |x| back-projections (``AlphaBeta._magnitude``, two
    transposed operations where float64's block form takes four), equal to the float64 reference to float32's
    rounding."""
    spy = _Spy(monkeypatch)
    layer = _layer(factory, 0)
    x, upper, ref = _data(layer, shape, ref_rule, False, 0)
    composite = LayerMap([(type(layer), engine())])
    got = lrpcli.attribute(nn.Sequential(layer).float(), x.float(), target=upper.float(), composite=composite)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-5 * float(ref.abs().max()), rtol=2e-5)
    assert (spy.pair, spy.general, spy.shared) == (0, 0, 1)
