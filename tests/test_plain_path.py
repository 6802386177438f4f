"""Every fast path of the engine against the plain, formula-shaped path (``lrpcli.rules.plain()``), in float64.

Each rule runs on each layer type it applies to in three settings: as a first layer (inputs of both signs), after
a ReLU and before one with relevance only where the ReLU passes (x >= 0, the layer keeps relu(z): the fused and
positive-output paths), and the same with relevance everywhere (z recomputed), sliced over the batch. The fast
result must equal the plain one to 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine import layercall
from lrpcli.engine.composites.base import LayerMap
from lrpcli.engine.modules import Sum
from lrpcli.engine.rules import (
    AlphaBeta,
    BetaSmooth,
    DeconvNet,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    GuidedBackprop,
    MaxPoolAverage,
    Norm,
    Pass,
    Stabilizer,
    WSquare,
    ZBox,
    ZPlus,
    formula,
    plain,
    zplus,
)

DT = torch.float64
ATOL = 1e-12

pytestmark = pytest.mark.usefixtures('one_thread')

# Both paths round differently where a denominator is a sum of terms; a stabilizer of 0.1 keeps every |s(den)|
# >= 0.1, so rounding is amplified at most tenfold on random data. Epsilon's denominator is the stored output in
# both paths, so it keeps its default.
EPS = 0.1
RULES = {
    'epsilon': lambda: Epsilon(1e-6),
    'epsilon_0.25_zb': lambda: Epsilon(0.25, zero_params=['bias']),
    'zplus': lambda: ZPlus(stabilizer=EPS),
    'zplus_clip': lambda: ZPlus(stabilizer=Stabilizer(0.5, 'clip')),
    'alphabeta_2_1': lambda: AlphaBeta(2, 1, stabilizer=EPS),
    'alphabeta_1_0': lambda: AlphaBeta(1, 0, stabilizer=EPS),
    'alphabeta_3_2_zb': lambda: AlphaBeta(3, 2, stabilizer=EPS, zero_params=['bias']),
    'alphabeta_rms': lambda: AlphaBeta(2, 1, stabilizer=Stabilizer(0.1, 'rms')),
    'gamma_0.25': lambda: Gamma(0.25, stabilizer=EPS),
    'gamma_1_zb': lambda: Gamma(1.0, stabilizer=EPS, zero_params=['bias']),
    'gamma_clip': lambda: Gamma(0.25, stabilizer=Stabilizer(0.5, 'clip')),
    'gamma_rms': lambda: Gamma(0.25, stabilizer=Stabilizer(0.1, 'rms')),  # composite auto's stabilizer
    'zbox': lambda: ZBox(-3.0, 3.0, stabilizer=EPS),
    'flat': lambda: Flat(stabilizer=EPS),
    'wsquare': lambda: WSquare(stabilizer=EPS),
}

# (id, factory, per-sample input shape)
LAYERS = [
    ('linear', lambda: nn.Linear(6, 5), (6,), False),
    ('conv1d', lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 9), False),
    ('conv2d_groups', lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2), (4, 7, 7), False),
    ('conv2d', lambda: nn.Conv2d(3, 4, (2, 3), padding=(1, 0)), (3, 5, 6), False),
    ('conv2d_same', lambda: nn.Conv2d(2, 3, 3, padding='same', padding_mode='reflect'), (2, 5, 5), False),
    ('conv2d_channels_last', lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), True),
    ('conv3d', lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 3, 4, 3), False),
    # depthwise (groups == in_channels): the mixed-sign forward on |x| and the shared back-projection
    ('conv2d_depthwise', lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (4, 7, 7), False),
    ('conv1d_depthwise_multiplier2', lambda: nn.Conv1d(3, 6, 3, padding=1, groups=3), (3, 8), False),
    # 1x1 convolutions with at least layerops.POINTWISE_MIN_POSITIONS output positions: matrix products
    ('conv1d_pointwise', lambda: nn.Conv1d(2, 3, 1), (2, 300), False),
    ('conv2d_pointwise', lambda: nn.Conv2d(3, 4, 1), (3, 16, 16), False),
    ('conv2d_pointwise_strided', lambda: nn.Conv2d(3, 4, 1, stride=2), (3, 33, 34), False),
    ('conv3d_pointwise', lambda: nn.Conv3d(2, 3, 1, stride=(1, 1, 2)), (2, 7, 7, 13), False),
    ('convT1d', lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 5), False),
    ('convT2d', lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 4, 4), False),
    ('convT3d', lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1), (2, 3, 2, 3), False),
]
SETTINGS = ('first', 'after_relu', 'sliced')


def _model(layer: nn.Module, setting: str) -> nn.Module:
    return nn.Sequential(layer) if setting == 'first' else nn.Sequential(nn.ReLU(), layer, nn.ReLU())


def _attribute(model: nn.Module, x: torch.Tensor, composite, target) -> torch.Tensor:
    return lrpcli.attribute(model, x, target=target, composite=composite)


def _fast_and_plain(model: nn.Module, x: torch.Tensor, composite, target) -> tuple[torch.Tensor, torch.Tensor]:
    fast = _attribute(model, x, composite, target)
    with plain():
        slow = _attribute(model, x, composite, target)
    assert not formula.enabled()
    return fast, slow


def _layer(factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = factory().to(DT)
    with torch.no_grad():
        layer.weight.mul_(3.0)
        layer.weight[torch.rand(layer.weight.shape) < 0.1] = 0.0  # exact zeros: W+ = W- = 0
        layer.bias.normal_(0.0, 0.3)
    return layer


@pytest.mark.parametrize('setting', SETTINGS)
@pytest.mark.parametrize('layer_id,factory,shape,channels_last', LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize('rule_id', list(RULES))
def test_fast_equals_plain(rule_id, layer_id, factory, shape, channels_last, setting, monkeypatch):
    if setting == 'sliced':  # every layer over slices of the batch, ZPlus's dense layers in blocks of rows
        monkeypatch.setattr(layercall, 'CHUNK_BYTES', 64)
        monkeypatch.setattr(zplus, 'BLOCK_BYTES', 64)
    layer = _layer(factory, seed=len(layer_id))
    model = _model(layer, setting)
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(7), dtype=DT)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    composite = LayerMap([(type(layer), RULES[rule_id]()), (nn.ReLU, Pass())])

    def target(out: torch.Tensor) -> torch.Tensor:  # the same for both paths
        upper = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=DT)
        return upper * (out > 0) if setting == 'after_relu' else upper  # after_relu: only where the ReLU passes

    fast, slow = _fast_and_plain(model, x, composite, target)
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    assert slow.abs().max() > 1e-3  # something was compared


class _Branches(nn.Module):
    """Two convolutions summed (a residual junction), pooled; a broadcast second summand."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.a, self.b, self.pool, self.sum = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 1), pool, Sum()
        self.shift = nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.sum(self.a(x), self.b(x), self.shift)))


POOLS = [
    ('maxpool_gradient', lambda: nn.MaxPool2d(2), Gradient),
    ('maxpool_average', lambda: nn.MaxPool2d(3, stride=2, padding=1), MaxPoolAverage),
    ('adaptive_maxpool_average', lambda: nn.AdaptiveMaxPool2d(3), MaxPoolAverage),
    ('avgpool_norm', lambda: nn.AvgPool2d(2, ceil_mode=True), Norm),
    ('adaptive_avgpool_norm', lambda: nn.AdaptiveAvgPool2d((2, 3)), Norm),
]


@pytest.mark.parametrize('pool_id,pool,pool_rule', POOLS, ids=[p[0] for p in POOLS])
@pytest.mark.parametrize('conv_rule', ['epsilon', 'alphabeta_2_1', 'gamma_0.25', 'zplus'])
def test_pools_and_sums(pool_id, pool, pool_rule, conv_rule):
    torch.manual_seed(3)
    model = _Branches(pool()).to(DT)
    x = torch.randn(2, 2, 7, 7, dtype=DT)
    composite = LayerMap([(nn.Conv2d, RULES[conv_rule]()), (Sum, Norm()), (type(model.pool), pool_rule())])
    fast, slow = _fast_and_plain(model, x, composite, None)
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    assert slow.abs().max() > 1e-3


@pytest.mark.parametrize('relu_rule', [BetaSmooth, GuidedBackprop, DeconvNet, Pass])
def test_relu_rules(relu_rule):
    """ReLU rules that read only the input make the session recompute relu(z) for the next layer (fast only)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(12, 5)).to(DT)
    x = torch.randn(2, 2, 8, 8, dtype=DT)
    composite = LayerMap([((nn.Conv2d, nn.Linear), Gradient()), (nn.ReLU, relu_rule()),
                          ((nn.MaxPool2d, nn.Flatten), Gradient())])
    fast, slow = _fast_and_plain(model, x, composite, 1)
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    assert slow.abs().max() > 1e-3


def test_plain_switch_scopes_and_nests():
    assert not formula.enabled()
    with plain():
        assert formula.enabled()
        with plain(False):
            assert not formula.enabled()
        assert formula.enabled()
    assert not formula.enabled()


@pytest.mark.parametrize('value,on', [('1', True), ('0', False), ('', False)])
def test_environment_variable_switches_the_plain_path_on(value, on):
    import os
    import subprocess
    import sys

    env = dict(os.environ, LRPCLI_PLAIN=value)
    code = 'from lrpcli.engine.rules import formula; print(formula.enabled())'
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(on)


def test_plain_formula_on_the_worked_example():
    """The plain path reproduces the worked dense example of the README's rule table."""
    layer = nn.Linear(3, 2).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.5, 1.0, -0.5], [-1.0, 1.0, 0.5]]))
        layer.bias.copy_(torch.tensor([0.25, -0.5]))
    x = torch.tensor([[2.0, -1.0, 1.0]], dtype=DT)
    expected = {Epsilon(1e-6): [3.0, -1.0, -0.5], ZPlus(): [1.6154, 0, 0], AlphaBeta(2, 1): [3.2308, -1.1667, -0.5833],
                Gamma(0.25): [2.5610, -0.6829, -0.3415], ZBox(-3.0, 3.0): [1.25, 0.3333, 0.1667],
                WSquare(): [1.1053, 0.4912, 0.1228], Flat(): [0.5833, 0.5833, 0.5833]}
    for rule, values in expected.items():
        with plain():
            r = lrpcli.attribute(layer, x, target=0, composite=LayerMap([(nn.Linear, rule)]))
        torch.testing.assert_close(r[0], torch.tensor(values, dtype=DT), atol=1e-4, rtol=0)


@pytest.mark.parametrize('composite', lrpcli.composites.names())
def test_builtin_composites_with_merged_batchnorm(composite):
    """Each built-in composite, with its canonizer's merged weights, on a small conv net."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 5)).to(DT).eval()
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(), bn.bias.normal_()
    x = torch.randn(2, 3, 10, 10, dtype=DT)
    fast = lrpcli.attribute(model, x, target=0, composite=composite, canonizers=['merge_batchnorm'])
    with plain():
        slow = lrpcli.attribute(model, x, target=0, composite=composite, canonizers=['merge_batchnorm'])
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    assert slow.abs().max() > 1e-4
