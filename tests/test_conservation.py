"""Whole-network properties: conservation on bias-free ReLU networks, and Epsilon(~0) = gradient x input.

Conservation holds exactly (up to the stabilizer) when every layer's rule is conservative for its inputs:
ZPlus / AlphaBeta / Gamma only see ReLU outputs (x >= 0) and zero biases; the first layer, whose input has
mixed sign, gets Epsilon, Flat or ZBox. All stabilizers are tiny so that they do not eat relevance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

DT = torch.float64
TINY = 1e-12


pytestmark = pytest.mark.usefixtures('one_thread')


def mlp(bias: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16, bias=bias), nn.ReLU(),
        nn.Linear(16, 16, bias=bias), nn.ReLU(),
        nn.Linear(16, 4, bias=bias),
    )


def cnn(bias: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=bias), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, bias=bias), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 4, bias=bias),
    )


NETS = {'mlp': (mlp, (8,)), 'cnn': (cnn, (2, 6, 6))}


def build(net: str, seed: int, bias: bool) -> tuple[nn.Module, torch.Tensor]:
    factory, in_shape = NETS[net]
    torch.manual_seed(seed)
    model = factory(bias).to(DT).eval()
    if bias:
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, 'bias', None) is not None:
                    m.bias.normal_(0, 0.3)
    x = torch.rand((3, *in_shape), dtype=DT) * 2 - 1  # mixed sign, inside the box [-1, 1]
    return model, x


def rest_map(rule):
    from lrpcli.engine.composites import LayerMap
    from lrpcli.engine.rules import Norm, Pass

    return LayerMap([
        ((nn.Linear, nn.Conv2d), rule),
        (nn.ReLU, Pass()),
        (nn.AvgPool2d, Norm(stabilizer=TINY)),
        (nn.Flatten, Pass()),
    ])


def composite(first: str, rest: str):
    from lrpcli.engine.composites import FirstLayer, Mixture
    from lrpcli.engine.rules import AlphaBeta, Epsilon, Flat, Gamma, ZBox, ZPlus

    rules = {
        'epsilon': lambda: Epsilon(1e-9),
        'zplus': lambda: ZPlus(stabilizer=TINY),
        'alphabeta': lambda: AlphaBeta(2, 1, stabilizer=TINY),
        'gamma': lambda: Gamma(0.25, stabilizer=TINY),
        'zbox': lambda: ZBox(-1.0, 1.0, stabilizer=TINY),
        'flat': lambda: Flat(stabilizer=TINY),
    }
    if first == rest:
        return rest_map(rules[rest]())
    return Mixture([FirstLayer((nn.Conv2d, nn.Linear), rules[first]()), rest_map(rules[rest]())])


COMBOS = [
    ('epsilon', 'epsilon'),
    ('epsilon', 'zplus'),
    ('zbox', 'zplus'),
    ('zbox', 'alphabeta'),
    ('flat', 'alphabeta'),
    ('zbox', 'gamma'),
    ('epsilon', 'gamma'),
    ('flat', 'epsilon'),
    ('zbox', 'epsilon'),
    ('flat', 'gamma'),
]


CONSERVATION_CASES = [
    pytest.param(first, rest, net, id=f'{first}+{rest}-{net}')
    for first, rest in COMBOS
    for net in sorted(NETS)
]


@pytest.mark.parametrize('first,rest,net', CONSERVATION_CASES)
def test_conservation_bias_free(first, rest, net):
    import lrpcli

    for seed in (0, 1):
        model, x = build(net, seed, bias=False)
        with torch.no_grad():
            logits = model(x)
        for target in (0, 3):
            rel = lrpcli.attribute(model, x, target=target, composite=composite(first, rest))
            assert rel.shape == x.shape and rel.dtype == DT
            got = rel.flatten(1).sum(1)
            want = logits[:, target].clone()
            if rest == 'alphabeta':
                # AlphaBeta(2, 1) is conservative only where the negative denominator is non-zero: when every
                # active input of the logit has a non-negative weight, den- = 0, the beta term vanishes and the
                # logit's relevance is doubled (alpha = 2); the layers below still conserve. (This happens for
                # the mlp, seed 1, class 0, sample 2.)
                with torch.no_grad():
                    h = model[:-1](x).flatten(1)
                    den_neg = h @ model[-1].weight[target].clamp(max=0)
                want = torch.where(den_neg == 0, 2 * want, want)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12,
                                       msg=lambda m, s=seed, c=target: f'seed {s} class {c}: {m}')


@pytest.mark.parametrize('net', sorted(NETS))
def test_epsilon_tiny_equals_gradient_times_input(net):
    import lrpcli
    from lrpcli.engine.rules import Epsilon

    for seed in (0, 1):
        model, x = build(net, seed, bias=True)
        for target in (1, 2):
            xg = x.clone().requires_grad_(True)
            logit = model(xg)[:, target].sum()
            (grad,) = torch.autograd.grad(logit, xg)
            gxi = (grad * x).detach()
            rel = lrpcli.attribute(model, x, target=target, composite=rest_map(Epsilon(1e-12)))
            torch.testing.assert_close(rel, gxi, atol=1e-8, rtol=0,
                                       msg=lambda m, s=seed, c=target: f'seed {s} class {c}: {m}')


def test_tensor_target_equals_int_target():
    import lrpcli

    model, x = build('cnn', 0, bias=True)
    with torch.no_grad():
        logits = model(x)
    onehot = torch.zeros_like(logits)
    onehot[:, 2] = 1
    comp = composite('zbox', 'gamma')
    a = lrpcli.attribute(model, x, target=2, composite=comp)
    b = lrpcli.attribute(model, x, target=logits * onehot, composite=comp)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
