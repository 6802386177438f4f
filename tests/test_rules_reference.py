"""The engine's rules against the dense reference in tests/reference_lrp.py, layer by layer, in float64.

One test per (rule, layer, bias); each runs three seeds. Inputs and upper relevance are normal noise (mixed
sign); a few weights are set exactly to zero. Data whose rule denominators come within 1e-3 of zero (where the
two implementations' rounding could be amplified beyond atol) is redrawn deterministically.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

try:
    from tests.reference_lrp import RefRule, dense_matrix, reference_lrp, reference_norm, reference_sum
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference_lrp import RefRule, dense_matrix, reference_lrp, reference_norm, reference_sum

DT = torch.float64
SEEDS = (0, 1, 2)
ATOL = 1e-8


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(autouse=True)
def pointwise_products(request, monkeypatch):
    """Layers with 'pointwise' in the test id take layerops' matrix-product path for 1x1 convolutions at any
    size (it starts at POINTWISE_MIN_POSITIONS output positions, too many for well-conditioned random data);
    the other 1x1 cases keep the convolution path."""
    from lrpcli.engine import layerops

    if 'pointwise' in request.node.name:
        monkeypatch.setattr(layerops, 'POINTWISE_MIN_POSITIONS', 1)


# ----------------------------------------------------------------------------------------------------------
# layers: (id, factory, per-sample input shape)

LAYERS = [
    ('linear', lambda: nn.Linear(6, 4), (6,)),
    ('conv1d', lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 7)),
    ('conv2d', lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2), (4, 6, 6)),
    ('conv2d_plain', lambda: nn.Conv2d(2, 3, (2, 3), padding=(1, 0)), (2, 4, 5)),
    ('conv3d', lambda: nn.Conv3d(2, 2, 2, stride=1, padding=1), (2, 3, 3, 3)),
    # 1x1 convolutions: with 'pointwise' in the id they run as matrix products (see ``pointwise_products``)
    ('conv2d_pointwise', lambda: nn.Conv2d(3, 4, 1), (3, 4, 4)),
    ('conv2d_pointwise_strided', lambda: nn.Conv2d(2, 3, 1, stride=2), (2, 5, 4)),
    ('conv1d_pointwise', lambda: nn.Conv1d(2, 3, 1, stride=(1,)), (2, 5)),
    ('conv3d_pointwise_strided', lambda: nn.Conv3d(2, 2, 1, stride=(1, 2, 3)), (2, 2, 3, 4)),
    ('convT1d', lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4)),
    ('convT2d', lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2,
                                           dilation=1), (4, 3, 3)),
    ('convT2d_dil', lambda: nn.ConvTranspose2d(2, 2, 2, stride=(2, 1), padding=(0, 1), dilation=2),
     (2, 3, 3)),
    ('convT3d', lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1, output_padding=1), (2, 2, 2, 2)),
]


# ----------------------------------------------------------------------------------------------------------
# rules: (id, engine factory(in_channels, **kw), reference factory(in_channels)); the engine factory gets
# zero_params=['bias'] through kw where the id ends in '_zb'. Per-channel ZBox bounds depend on the channels.


def _per_channel_bounds(c: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    low = tuple(-2.5 - 0.25 * k for k in range(c))
    high = tuple(2.0 + 0.5 * k for k in range(c))
    return low, high


def _stab(eps, mode):
    from lrpcli.engine.rules import Stabilizer

    return Stabilizer(eps, mode)


def _engine_rules():
    from lrpcli.engine.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus

    def zbox_pc(c, **kw):
        low, high = _per_channel_bounds(c)
        return ZBox(low=torch.tensor(low, dtype=DT), high=torch.tensor(high, dtype=DT), **kw)

    return {
        'epsilon_1e-6': lambda c, **kw: Epsilon(epsilon=1e-6, **kw),
        'epsilon_0.25': lambda c, **kw: Epsilon(epsilon=0.25, **kw),
        'zplus': lambda c, **kw: ZPlus(**kw),
        'alphabeta_2_1': lambda c, **kw: AlphaBeta(alpha=2, beta=1, **kw),
        'alphabeta_1_0': lambda c, **kw: AlphaBeta(alpha=1, beta=0, **kw),
        'gamma_0.25': lambda c, **kw: Gamma(gamma=0.25, **kw),
        'gamma_1': lambda c, **kw: Gamma(gamma=1.0, **kw),
        'zbox_scalar': lambda c, **kw: ZBox(low=-3.0, high=3.0, **kw),
        'zbox_asym': lambda c, **kw: ZBox(low=-1.0, high=2.0, **kw),
        'zbox_channel': zbox_pc,
        'flat': lambda c, **kw: Flat(**kw),
        'wsquare': lambda c, **kw: WSquare(**kw),
        # stabilizer modes
        'zplus_clip': lambda c, **kw: ZPlus(stabilizer=_stab(0.5, 'clip'), **kw),
        'zplus_rms': lambda c, **kw: ZPlus(stabilizer=_stab(0.1, 'rms'), **kw),
        'alphabeta_2_1_clip': lambda c, **kw: AlphaBeta(alpha=2, beta=1, stabilizer=_stab(0.5, 'clip'), **kw),
        'alphabeta_2_1_rms': lambda c, **kw: AlphaBeta(alpha=2, beta=1, stabilizer=_stab(0.1, 'rms'), **kw),
        'gamma_0.25_clip': lambda c, **kw: Gamma(gamma=0.25, stabilizer=_stab(0.5, 'clip'), **kw),
        'gamma_0.25_rms': lambda c, **kw: Gamma(gamma=0.25, stabilizer=_stab(0.1, 'rms'), **kw),
        'gamma_0.25_num': lambda c, **kw: Gamma(gamma=0.25, stabilizer=0.05, **kw),
        'zbox_clip': lambda c, **kw: ZBox(low=-3.0, high=3.0, stabilizer=_stab(0.5, 'clip'), **kw),
        'zbox_rms': lambda c, **kw: ZBox(low=-3.0, high=3.0, stabilizer=_stab(0.1, 'rms'), **kw),
        'wsquare_clip': lambda c, **kw: WSquare(stabilizer=_stab(0.5, 'clip'), **kw),
        'wsquare_rms': lambda c, **kw: WSquare(stabilizer=_stab(0.1, 'rms'), **kw),
        'flat_rms': lambda c, **kw: Flat(stabilizer=_stab(0.1, 'rms'), **kw),
    }


def _ref_rule(rule_id: str, c: int, zero_bias: bool) -> RefRule:
    kw = {'zero_bias': zero_bias}
    if rule_id.endswith('_clip'):
        kw.update(eps=0.5, mode='clip')
    elif rule_id.endswith('_rms'):
        kw.update(eps=0.1, mode='rms')
    elif rule_id.endswith('_num'):
        kw.update(eps=0.05)
    base = rule_id.removesuffix('_clip').removesuffix('_rms').removesuffix('_num')
    if base == 'epsilon_1e-6':
        return RefRule('epsilon', eps=1e-6, **kw)
    if base == 'epsilon_0.25':
        return RefRule('epsilon', eps=0.25, **kw)
    if base == 'zplus':
        return RefRule('zplus', **kw)
    if base == 'alphabeta_2_1':
        return RefRule('alphabeta', alpha=2.0, beta=1.0, **kw)
    if base == 'alphabeta_1_0':
        return RefRule('alphabeta', alpha=1.0, beta=0.0, **kw)
    if base == 'gamma_0.25':
        return RefRule('gamma', gamma=0.25, **kw)
    if base == 'gamma_1':
        return RefRule('gamma', gamma=1.0, **kw)
    if base in ('zbox_scalar', 'zbox'):
        return RefRule('zbox', low=-3.0, high=3.0, **kw)
    if base == 'zbox_asym':
        return RefRule('zbox', low=-1.0, high=2.0, **kw)
    if base == 'zbox_channel':
        low, high = _per_channel_bounds(c)
        return RefRule('zbox', low=low, high=high, **kw)
    if base == 'flat':
        return RefRule('flat', **kw)
    if base == 'wsquare':
        return RefRule('wsquare', **kw)
    raise KeyError(rule_id)


RULE_IDS = [
    'epsilon_1e-6', 'epsilon_0.25', 'zplus', 'alphabeta_2_1', 'alphabeta_1_0', 'gamma_0.25', 'gamma_1',
    'zbox_scalar', 'zbox_asym', 'zbox_channel', 'flat', 'wsquare',
    'zplus_clip', 'zplus_rms', 'alphabeta_2_1_clip', 'alphabeta_2_1_rms', 'gamma_0.25_clip', 'gamma_0.25_rms',
    'gamma_0.25_num', 'zbox_clip', 'zbox_rms', 'wsquare_clip', 'wsquare_rms', 'flat_rms',
]
# zero_params=['bias'] variants (only meaningful on layers that have a bias)
ZB_RULE_IDS = ['epsilon_1e-6', 'epsilon_0.25', 'zplus', 'alphabeta_2_1', 'alphabeta_1_0', 'gamma_0.25',
               'gamma_1', 'zbox_scalar', 'flat', 'wsquare', 'gamma_0.25_rms', 'wsquare_clip']

CASES = []
for _layer_id, _factory, _shape in LAYERS:
    for _rule_id in RULE_IDS:
        for _bias in (True, False):
            CASES.append(pytest.param(_rule_id, False, _layer_id, _bias,
                                      id=f'{_rule_id}-{_layer_id}-{"bias" if _bias else "nobias"}'))
    for _rule_id in ZB_RULE_IDS:
        CASES.append(pytest.param(_rule_id, True, _layer_id, True, id=f'{_rule_id}_zb-{_layer_id}-bias'))

LAYER_BY_ID = {lid: (f, s) for lid, f, s in LAYERS}
LAYER_BY_ID['linear_6x7'] = (lambda: nn.Linear(6, 7), (6,))  # more outputs than a block of 3 (ZPlus in blocks)


# ----------------------------------------------------------------------------------------------------------
# helpers


def make_layer(factory, bias: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = factory()
    if not bias:
        layer.bias = None
    layer = layer.to(DT)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=g, dtype=DT) * 0.6
        w[torch.rand(w.shape, generator=g) < 0.12] = 0.0  # exact zeros: W+ = W- = 0, still connected for Flat
        layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=DT) * 0.5)
    return layer


def engine_attribute(model: nn.Module, x: torch.Tensor, upper: torch.Tensor, composite) -> torch.Tensor:
    import lrpcli

    return lrpcli.attribute(model, x, target=upper, composite=composite)


def _smallest_nonzero(t: torch.Tensor) -> float:
    a = t.abs().flatten()
    a = a[a != 0]
    return a.min().item() if a.numel() else float('inf')


def well_conditioned_data(layer, in_shape, seed, ref_rule, ref_fn=None, nonnegative=False):
    """Draw (x, upper) of mixed sign (x rectified, as after a ReLU, if ``nonnegative``); redraw while a signed
    denominator or output is within 1e-3 of zero."""
    g = torch.Generator().manual_seed(seed)
    ref_fn = ref_fn or (lambda x_, r_: reference_lrp(layer, x_, r_, ref_rule))
    for _ in range(30):
        x = torch.randn((2, *in_shape), generator=g, dtype=DT)
        if nonnegative:
            x = x.clamp(min=0)
        with torch.no_grad():
            out = layer(x)
        upper = torch.randn(out.shape, generator=g, dtype=DT)
        ref, dens = ref_fn(x, upper)
        # exact zeros are structural (an output with no connected input or only zero weights): harmless
        checks = [_smallest_nonzero(d) for d in dens] + [_smallest_nonzero(out)]
        if min(checks) > 1e-3:
            return x, upper, ref
    raise AssertionError('could not draw well-conditioned data')


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f'{k} changed by attribute()'


# ----------------------------------------------------------------------------------------------------------
# tests


def check_against_reference(rule_id: str, layer_id: str, zero_bias: bool, bias: bool,
                            nonnegative: bool = False) -> None:
    """The engine's rule on one layer against the dense reference, for every seed: values within ATOL, shape and
    dtype as the input's, the layer's state untouched."""
    from lrpcli.engine.composites import LayerMap

    factory, in_shape = LAYER_BY_ID[layer_id]
    c = in_shape[0]
    kw = {'zero_params': ['bias']} if zero_bias else {}
    for seed in SEEDS:
        layer = make_layer(factory, bias, seed)
        ref_rule = _ref_rule(rule_id, c, zero_bias)
        x, upper, ref = well_conditioned_data(layer, in_shape, seed, ref_rule, nonnegative=nonnegative)
        if nonnegative:
            assert (x == 0).any() and (x > 0).any()
        rule = _engine_rules()[rule_id](c, **kw)
        model = nn.Sequential(layer)
        before = state_copy(model)
        got = engine_attribute(model, x.clone(), upper.clone(), LayerMap([(type(layer), rule)]))
        assert got.shape == x.shape
        assert got.dtype == DT
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m, s=seed: f'seed {s}: {m}')
        assert_state_unchanged(model, before)


@pytest.mark.parametrize('rule_id,zero_bias,layer_id,bias', CASES)
def test_rule_matches_reference(rule_id, zero_bias, layer_id, bias):
    check_against_reference(rule_id, layer_id, zero_bias, bias)


SIGN_SPLIT_RULE_IDS = ['zplus', 'alphabeta_2_1', 'alphabeta_1_0', 'gamma_0.25', 'gamma_1', 'zplus_rms',
                       'alphabeta_2_1_clip', 'alphabeta_2_1_rms', 'gamma_0.25_clip', 'gamma_0.25_rms',
                       'gamma_0.25_num']


@pytest.mark.parametrize('zero_bias,bias', [(False, True), (False, False), (True, True)],
                         ids=['bias', 'nobias', 'zb'])
@pytest.mark.parametrize('layer_id', [lid for lid, _, _ in LAYERS])
@pytest.mark.parametrize('rule_id', SIGN_SPLIT_RULE_IDS)
def test_rule_matches_reference_nonnegative_input(rule_id, layer_id, zero_bias, bias):
    """Inputs >= 0 with exact zeros (as after a ReLU): the fused path of Gamma and AlphaBeta (one forward, one
    transposed operation through stacked weights) and ZPlus's single-sign path against the same reference."""
    check_against_reference(rule_id, layer_id, zero_bias, bias, nonnegative=True)


@pytest.mark.parametrize('rule_id', ['zplus', 'zplus_clip', 'zplus_rms'])
@pytest.mark.parametrize('zero_bias,bias', [(False, True), (False, False), (True, True)],
                         ids=['bias', 'nobias', 'zb'])
def test_zplus_dense_in_blocks_matches_reference(monkeypatch, rule_id, zero_bias, bias):
    """ZPlus on a large dense layer with x >= 0 forms W+ a block of rows at a time (blocks of 3 of 7 rows here)."""
    import lrpcli.engine.rules.zplus as zplus

    monkeypatch.setattr(zplus, 'BLOCK_BYTES', 3 * 6 * 8)
    check_against_reference(rule_id, 'linear_6x7', zero_bias, bias, nonnegative=True)


def test_reference_gamma_zero_is_zplus_on_positive_data():
    """Self-check of the reference: Gamma(0) = Epsilon(stab) and large gamma tends to ZPlus, for x >= 0."""
    layer = make_layer(LAYERS[2][1], True, 0)
    x = torch.rand((2, 4, 6, 6), dtype=DT, generator=torch.Generator().manual_seed(3))
    upper = torch.randn(layer(x).shape, dtype=DT, generator=torch.Generator().manual_seed(4))
    g0, _ = reference_lrp(layer, x, upper, RefRule('gamma', gamma=0.0))
    e0, _ = reference_lrp(layer, x, upper, RefRule('epsilon', eps=1e-6))
    torch.testing.assert_close(g0, e0, atol=1e-9, rtol=0)
    # the elementwise view: for a conv each (output, input) pair is joined by at most one kernel tap
    A = dense_matrix(layer, (4, 6, 6))
    Ap = dense_matrix(layer, (4, 6, 6), layer.weight.detach().clamp(min=0))
    torch.testing.assert_close(Ap, A.clamp(min=0), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Norm on parameter-free layers, and Sum

NORM_LAYERS = [
    ('avgpool1d', lambda: nn.AvgPool1d(2), (2, 6)),
    ('avgpool2d', lambda: nn.AvgPool2d(2), (2, 4, 4)),
    ('avgpool2d_pad', lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 5, 5)),
    ('avgpool2d_pad_excl', lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 5, 5)),
    ('avgpool3d', lambda: nn.AvgPool3d(2), (2, 2, 4, 4)),
    ('adaptiveavgpool1d', lambda: nn.AdaptiveAvgPool1d(3), (2, 7)),
    ('adaptiveavgpool2d', lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 5)),
    ('adaptiveavgpool2d_1', lambda: nn.AdaptiveAvgPool2d(1), (3, 3, 3)),
    ('upsample_nearest', lambda: nn.Upsample(scale_factor=2, mode='nearest'), (2, 3, 3)),
    ('upsample_bilinear', lambda: nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False),
     (2, 3, 3)),
]


def _norm_rule(mode):
    from lrpcli.engine.rules import Norm

    if mode is None:
        return Norm(), 1e-6, 'sign'
    if mode == 'clip':
        return Norm(stabilizer=_stab(0.5, 'clip')), 0.5, 'clip'
    return Norm(stabilizer=_stab(0.1, 'rms')), 0.1, 'rms'


@pytest.mark.parametrize('mode', [None, 'clip', 'rms'])
@pytest.mark.parametrize('layer_id,factory,in_shape', NORM_LAYERS, ids=[n[0] for n in NORM_LAYERS])
def test_norm_matches_reference(layer_id, factory, in_shape, mode):
    from lrpcli.engine.composites import LayerMap

    for seed in SEEDS:
        layer = factory()
        rule, eps, smode = _norm_rule(mode)

        def ref_fn(x_, r_, ly=layer, eps=eps, smode=smode):
            return reference_norm(ly, x_, r_, eps, smode)

        x, upper, ref = well_conditioned_data(layer, in_shape, seed, None, ref_fn=ref_fn)
        model = nn.Sequential(layer)
        got = engine_attribute(model, x.clone(), upper.clone(), LayerMap([(type(layer), rule)]))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m, s=seed: f'seed {s}: {m}')


class _SumModel(nn.Module):
    """Splits the input along features into k parts and adds them with lrpcli.Sum."""

    def __init__(self, k: int):
        super().__init__()
        import lrpcli

        self.k = k
        self.add = lrpcli.Sum()

    def forward(self, x):
        return self.add(*x.chunk(self.k, dim=1))


@pytest.mark.parametrize('mode', [None, 'clip', 'rms'])
@pytest.mark.parametrize('k', [2, 3])
def test_sum_norm_matches_reference(k, mode):
    import lrpcli
    from lrpcli.engine.composites import LayerMap

    for seed in SEEDS:
        model = _SumModel(k)
        rule, eps, smode = _norm_rule(mode)

        def ref_fn(x_, r_, k=k, eps=eps, smode=smode):
            outs, dens = reference_sum(list(x_.chunk(k, dim=1)), r_, eps, smode)
            return torch.cat(outs, dim=1), dens

        x, upper, ref = well_conditioned_data(model, (2 * k, 3, 2), seed, None, ref_fn=ref_fn)
        got = engine_attribute(model, x.clone(), upper.clone(), LayerMap([(lrpcli.Sum, rule)]))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=lambda m, s=seed: f'seed {s}: {m}')


@pytest.mark.parametrize('layer_id', [lid for lid, _, _ in LAYERS])
def test_reference_epsilon_matches_autograd_formula(layer_id):
    """Self-check of the dense matrices: Epsilon = x * grad(z . stop_grad(R / s(z))) on every layer type."""
    factory, in_shape = LAYER_BY_ID[layer_id]
    layer = make_layer(factory, True, 0)
    x = torch.randn((2, *in_shape), dtype=DT, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    z = layer(x)
    upper = torch.randn(z.shape, dtype=DT, generator=torch.Generator().manual_seed(6))
    q = (upper / (z + 0.1 * torch.where(z >= 0, 1.0, -1.0).to(DT))).detach()
    (grad,) = torch.autograd.grad(z, x, grad_outputs=q)
    ref, _ = reference_lrp(layer, x.detach(), upper, RefRule('epsilon', eps=0.1))
    torch.testing.assert_close(ref, (x * grad).detach(), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# structurally zero denominators with a tiny stabilizer


def _linear_with_zero_denominator(seed: int, kind: str):
    """A Linear layer where one denominator of output 0 is exactly zero although its inputs are active.

    kind 'den_neg' (AlphaBeta): inputs >= 0 and output 0 has positive weights only, so den-_0 = 0.
    kind 'den_pos' (ZPlus, AlphaBeta): inputs of mixed sign (even features > 0, odd < 0); output 0 has W < 0
    on the positive and W > 0 on the negative inputs, so every contribution x_i W_0i < 0 and den+_0 = 0.
    """
    layer = make_layer(LAYERS[0][1], False, seed)
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand((2, 6), generator=g, dtype=DT) + 0.1
    upper = torch.randn((2, 4), generator=g, dtype=DT)
    with torch.no_grad():
        w0 = layer.weight[0].abs() + 0.1
        if kind == 'den_neg':
            x = magnitude * (torch.rand((2, 6), generator=g) < 0.7)
            layer.weight[0] = w0
        else:
            sign = torch.tensor([1.0, -1.0] * 3, dtype=DT)
            x = magnitude * sign
            layer.weight[0] = -sign * w0
    return layer, x, upper


# A zero denominator gives a coefficient R / s(0) = R / eps; the back-projection must meet it with exact zeros
# (x_i W_ji = 0 for every term of that denominator), never cancel two terms of size |R| / eps.
CASES_ZERO_DEN = [
    pytest.param(kind, rule_id, eps, seed, id=f'{rule_id}-{kind}-eps{eps:g}-seed{seed}',
                 )
    for kind, rule_id in [('den_neg', 'alphabeta_2_1'), ('den_pos', 'alphabeta_2_1'), ('den_pos', 'zplus')]
    for eps in (1e-6, 1e-9, 1e-12)
    for seed in SEEDS
]


def _zero_den_rules(rule_id, eps):
    from lrpcli.engine.rules import AlphaBeta, ZPlus

    if rule_id == 'zplus':
        return RefRule('zplus', eps=eps), ZPlus(stabilizer=eps)
    return RefRule('alphabeta', alpha=2.0, beta=1.0, eps=eps), AlphaBeta(2, 1, stabilizer=eps)


@pytest.mark.parametrize('kind,rule_id,eps,seed', CASES_ZERO_DEN)
def test_exactly_zero_denominator_tiny_stabilizer(kind, rule_id, eps, seed):
    """The zero-denominator term is 0 / s(0) = 0 element-wise, whatever eps is: nothing may blow up."""
    from lrpcli.engine.composites import LayerMap

    layer, x, upper = _linear_with_zero_denominator(seed, kind)
    ref_rule, rule = _zero_den_rules(rule_id, eps)
    ref, _ = reference_lrp(layer, x, upper, ref_rule)
    got = engine_attribute(nn.Sequential(layer), x, upper, LayerMap([(nn.Linear, rule)]))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize('kind,rule_id', [('den_neg', 'alphabeta_2_1'), ('den_pos', 'alphabeta_2_1'),
                                          ('den_pos', 'zplus')])
def test_exactly_zero_denominator_float32_default_stabilizer(kind, rule_id):
    """The same situation in float32 (the default relevance dtype) with the default stabilizer 1e-6:
    the engine must stay within float32 accuracy (1e-5 of the largest relevance) of the float64 reference."""
    from lrpcli.engine.composites import LayerMap

    for seed in SEEDS:
        layer, x, upper = _linear_with_zero_denominator(seed, kind)
        ref_rule, rule = _zero_den_rules(rule_id, 1e-6)
        ref, _ = reference_lrp(layer, x, upper, ref_rule)
        layer32 = copy.deepcopy(layer).float()
        got = engine_attribute(nn.Sequential(layer32), x.float(), upper.float(), LayerMap([(nn.Linear, rule)]))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0,
                                   msg=lambda m, s=seed: f'seed {s}: {m}')
