"""Rules on tiny layers whose relevance was computed by hand (one worked example and more).

All numbers in the comments were worked out on paper from the formulas, not produced by running code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

DT = torch.float64


def t(*values):
    return torch.tensor(values, dtype=DT)


def linear(weight, bias=None) -> nn.Linear:
    weight = torch.tensor(weight, dtype=DT)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(DT)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=DT))
    return layer


def attribute(layer, x, target, rule):
    import lrpcli
    from lrpcli.engine.composites import LayerMap

    return lrpcli.attribute(nn.Sequential(layer), x, target=target, composite=LayerMap([(type(layer), rule)]))


# ----------------------------------------------------------------------------------------------------------
# the worked example: x = [2, -1, 1], W = [[1.5, 1, -0.5], [-1, 1, 0.5]], b = [0.25, -0.5], z = [1.75, -3],
# R = z * onehot(0) = [1.75, 0]; default stabilizer 1e-6 (sign mode).

WORKED = [
    # (rule id, expected relevance, expected sum)
    ('Epsilon(1e-6)', [3.0, -1.0, -0.5], 1.5),
    ('Epsilon(0.25)', [2.625, -0.875, -0.4375], 1.3125),
    ('ZPlus', [1.6154, 0.0, 0.0], 1.6154),
    ('AlphaBeta(2, 1)', [3.2308, -1.1667, -0.5833], 1.4808),
    ('Gamma(0.25)', [2.5610, -0.6829, -0.3415], 1.5366),
    ('ZBox(-3, 3)', [1.25, 0.3333, 0.1667], 1.75),
    ('WSquare', [1.1053, 0.4912, 0.1228], 1.7193),
    ('Flat', [0.5833, 0.5833, 0.5833], 1.75),
]


def _worked_rule(name):
    from lrpcli.engine.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus

    return {
        'Epsilon(1e-6)': lambda: Epsilon(1e-6),
        'Epsilon(0.25)': lambda: Epsilon(0.25),
        'ZPlus': lambda: ZPlus(),
        'AlphaBeta(2, 1)': lambda: AlphaBeta(2, 1),
        'Gamma(0.25)': lambda: Gamma(0.25),
        'ZBox(-3, 3)': lambda: ZBox(-3, 3),
        'WSquare': lambda: WSquare(),
        'Flat': lambda: Flat(),
    }[name]()


def _worked_layer():
    return linear([[1.5, 1, -0.5], [-1, 1, 0.5]], [0.25, -0.5])


@pytest.mark.parametrize('target_kind', ['tensor', 'int'])
@pytest.mark.parametrize('name,expected,total', WORKED, ids=[w[0] for w in WORKED])
def test_design_worked_example(name, expected, total, target_kind):
    layer = _worked_layer()
    x = t(2, -1, 1)[None]
    target = t(1.75, 0)[None] if target_kind == 'tensor' else 0
    got = attribute(layer, x, target, _worked_rule(name))
    assert got.shape == (1, 3)
    torch.testing.assert_close(got[0], t(*expected), atol=1e-4, rtol=0)
    assert abs(got.sum().item() - total) < 1e-4


def test_worked_example_output_is_as_stated():
    layer = _worked_layer()
    torch.testing.assert_close(layer(t(2, -1, 1)[None])[0], t(1.75, -3), atol=1e-12, rtol=0)


def test_worked_example_zbox_is_exactly_conservative():
    from lrpcli.engine.rules import Stabilizer, ZBox

    rule = ZBox(-3, 3, stabilizer=Stabilizer(0.0))
    got = attribute(_worked_layer(), t(2, -1, 1)[None], t(1.75, 0)[None], rule)
    # c = [7.5, 2, 1] (sum 10.5): [7.5, 2, 1] * 1.75 / 10.5 = [1.25, 1/3, 1/6]
    torch.testing.assert_close(got[0], t(1.25, 1 / 3, 1 / 6), atol=1e-12, rtol=0)


def test_worked_example_epsilon_zero_bias():
    from lrpcli.engine.rules import Epsilon

    # bias dropped: z_0 = 3 - 1 - 0.5 = 1.5; R = [3, -1, -0.5] * 1.75 / 1.5 = [3.5, -7/6, -7/12]
    got = attribute(_worked_layer(), t(2, -1, 1)[None], t(1.75, 0)[None], Epsilon(1e-9, zero_params=['bias']))
    torch.testing.assert_close(got[0], t(3.5, -7 / 6, -7 / 12), atol=1e-7, rtol=0)


def test_worked_example_gamma_zero_bias():
    from lrpcli.engine.rules import Gamma

    # bias dropped: z_0 = 1.5 >= 0. Contributions [3.75, -1, -0.5] (as with bias), den = 2.25 (no bias term)
    # R = [3.75, -1, -0.5] * 1.75 / 2.25 = [2.916667, -0.777778, -0.388889]
    got = attribute(_worked_layer(), t(2, -1, 1)[None], t(1.75, 0)[None], Gamma(0.25, zero_params=['bias']))
    want = t(3.75, -1, -0.5) * 1.75 / 2.25
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# more hand-computed cases


def test_zplus_ignores_negative_contributions():
    from lrpcli.engine.rules import AlphaBeta, ZPlus

    # x = [1, -2], W = [[1, 1]], b = 0.5: z = 1 - 2 + 0.5 = -0.5.
    # ZPlus: x+W+ = [1, 0] (x_1 = -2 pairs with W- = 0), den = 1 + b+ = 1.5; R_out = [3] -> [2, 0]
    layer = linear([[1, 1]], [0.5])
    got = attribute(layer, t(1, -2)[None], t(3)[None], ZPlus(stabilizer=1e-12))
    torch.testing.assert_close(got[0], t(2, 0), atol=1e-10, rtol=0)
    # AlphaBeta(1, 0) is the same formula
    got = attribute(layer, t(1, -2)[None], t(3)[None], AlphaBeta(1, 0, stabilizer=1e-12))
    torch.testing.assert_close(got[0], t(2, 0), atol=1e-10, rtol=0)


def test_zplus_negative_input_with_negative_weight_counts():
    from lrpcli.engine.rules import ZPlus

    # x = [1, -2, 3], W = [[1, -1, -1]], no bias: z = 1 + 2 - 3 = 0.
    # ZPlus: x0+ W+ = 1, x1- W- = (-2)(-1) = 2, x2+ pairs with W+ = 0 -> 0; den = 3; R_out = [6] -> [2, 4, 0]
    layer = linear([[1, -1, -1]])
    got = attribute(layer, t(1, -2, 3)[None], t(6)[None], ZPlus(stabilizer=1e-12))
    torch.testing.assert_close(got[0], t(2, 4, 0), atol=1e-10, rtol=0)


def test_alphabeta_2_1_by_hand():
    from lrpcli.engine.rules import AlphaBeta

    # same layer: positive part P = [1, 2, 0] (den+ 3), negative part N = [0, 0, -3] (x2+ W-; den- = -3)
    # R_out = 6: 2 * P * 6/3 - 1 * N * 6/(-3) = [4, 8, 0] - [0, 0, 6] = [4, 8, -6]
    layer = linear([[1, -1, -1]])
    got = attribute(layer, t(1, -2, 3)[None], t(6)[None], AlphaBeta(2, 1, stabilizer=1e-12))
    torch.testing.assert_close(got[0], t(4, 8, -6), atol=1e-10, rtol=0)


def test_gamma_negative_output_by_hand():
    from lrpcli.engine.rules import Gamma

    # x = [1, -1], W = [[1, 2]], b = 0: z = -1 < 0, so the mirrored branch:
    # x0+ with W + g W- = 1 + 0.5 * 0 = 1 -> 1;  x1- with W + g W+ = 2 + 0.5 * 2 = 3 -> -3;  den = -2
    # R_out = -1: [1, -3] * (-1) / (-2) = [0.5, -1.5]  (sum -1)
    layer = linear([[1, 2]], [0.0])
    got = attribute(layer, t(1, -1)[None], t(-1)[None], Gamma(0.5, stabilizer=1e-12))
    torch.testing.assert_close(got[0], t(0.5, -1.5), atol=1e-10, rtol=0)


def test_gamma_bias_decides_the_branch():
    from lrpcli.engine.rules import Gamma

    # x = [1, -1], W = [[1, 2]], b = 1.5: z = 0.5 >= 0 (the bias decides), positive branch with g = 1:
    # x0+ with W + W+ = 2 -> 2; x1- with W + W- = 2 + 0 = 2 -> -2; bias b + b+ = 3; den = 3
    # R_out = 3: [2, -2] * 3 / 3 = [2, -2]
    layer = linear([[1, 2]], [1.5])
    got = attribute(layer, t(1, -1)[None], t(3)[None], Gamma(1.0, stabilizer=1e-12))
    torch.testing.assert_close(got[0], t(2, -2), atol=1e-10, rtol=0)
    # zero_params=['bias']: z = -1 < 0, mirrored branch: x0+ with W + W- = 1 -> 1, x1- with W + W+ = 4 -> -4;
    # den = -3; R_out = 3: [1, -4] * 3 / (-3) = [-1, 4]
    got = attribute(layer, t(1, -1)[None], t(3)[None], Gamma(1.0, stabilizer=1e-12, zero_params=['bias']))
    torch.testing.assert_close(got[0], t(-1, 4), atol=1e-10, rtol=0)


def test_wsquare_by_hand():
    from lrpcli.engine.rules import WSquare

    # W = [[1, 2], [3, 0]], b = [1, 0]: den = [1 + 4 + 1, 9 + 0] = [6, 9]; R_out = [6, 9]
    # R = [1 * 6/6 + 9 * 9/9, 4 * 6/6 + 0] = [10, 4]   (independent of x)
    layer = linear([[1, 2], [3, 0]], [1.0, 0.0])
    got = attribute(layer, t(-5, 7)[None], t(6, 9)[None], WSquare(stabilizer=1e-12))
    torch.testing.assert_close(got[0], t(10, 4), atol=1e-10, rtol=0)
    # without the bias: den = [5, 9]: [6/5 + 9, 24/5] = [10.2, 4.8]
    got = attribute(layer, t(-5, 7)[None], t(6, 9)[None], WSquare(stabilizer=1e-12, zero_params=['bias']))
    torch.testing.assert_close(got[0], t(10.2, 4.8), atol=1e-10, rtol=0)


def test_zbox_per_channel_by_hand():
    from lrpcli.engine.rules import ZBox

    # x = [0, 1], W = [[1, -1]], low = [-1, 0], high = [1, 2], bias 7 (ignored by ZBox):
    # c0 = 0*1 - (-1)*1 - 1*0 = 1;  c1 = 1*(-1) - 0*0 - 2*(-1) = 1;  den = 2;  R_out = 4 -> [2, 2]
    layer = linear([[1, -1]], [7.0])
    rule = ZBox(low=t(-1, 0), high=t(1, 2), stabilizer=1e-12)
    got = attribute(layer, t(0, 1)[None], t(4)[None], rule)
    torch.testing.assert_close(got[0], t(2, 2), atol=1e-10, rtol=0)


def _conv1d_2tap():
    conv = nn.Conv1d(1, 1, 2, bias=False).to(DT)
    with torch.no_grad():
        conv.weight.copy_(t(2, 1).reshape(1, 1, 2))
    return conv


def test_conv1d_two_taps_epsilon():
    from lrpcli.engine.rules import Epsilon

    # kernel [2, 1], x = [1, 2, -1, 3]: z_k = 2 x_k + x_{k+1} = [4, 3, 1]; R_out = [1, 1, 1]
    # R0 = 1*2/4 = 0.5
    # R1 = 2*1/4 + 2*2/3 = 0.5 + 4/3
    # R2 = -1*1/3 + (-1)*2/1 = -1/3 - 2
    # R3 = 3*1/1 = 3            (sum 3 = sum of R_out)
    x = t(1, 2, -1, 3).reshape(1, 1, 4)
    got = attribute(_conv1d_2tap(), x, t(1, 1, 1).reshape(1, 1, 3), Epsilon(1e-12))
    torch.testing.assert_close(got.flatten(), t(0.5, 0.5 + 4 / 3, -1 / 3 - 2, 3), atol=1e-10, rtol=0)


def test_conv1d_two_taps_zplus_and_flat():
    from lrpcli.engine.rules import Flat, ZPlus

    x = t(1, 2, -1, 3).reshape(1, 1, 4)
    r = t(1, 1, 1).reshape(1, 1, 3)
    # ZPlus: z0: [2, 2] den 4; z1: [4, x2- W- = 0] den 4; z2: [x2- W- = 0, 3] den 3
    # R = [2/4, 2/4 + 4/4, 0, 3/3] = [0.5, 1.5, 0, 1]
    got = attribute(_conv1d_2tap(), x, r, ZPlus(stabilizer=1e-12))
    torch.testing.assert_close(got.flatten(), t(0.5, 1.5, 0, 1), atol=1e-10, rtol=0)
    # Flat: every output has 2 inputs: [1/2, 1/2 + 1/2, 1/2 + 1/2, 1/2]
    got = attribute(_conv1d_2tap(), x, r, Flat(stabilizer=1e-12))
    torch.testing.assert_close(got.flatten(), t(0.5, 1, 1, 0.5), atol=1e-10, rtol=0)


def test_conv1d_padding_flat_counts_only_real_inputs():
    from lrpcli.engine.rules import Flat

    # kernel 2, padding 1, x of length 3 -> 4 outputs:
    # o0 = {pad, x0}, o1 = {x0, x1}, o2 = {x1, x2}, o3 = {x2, pad}
    # counts [1, 2, 2, 1]; R_out = [1, 2, 4, 8]: x0 = 1/1 + 2/2 = 2; x1 = 2/2 + 4/2 = 3; x2 = 4/2 + 8/1 = 10
    conv = nn.Conv1d(1, 1, 2, padding=1, bias=False).to(DT)
    with torch.no_grad():
        conv.weight.copy_(t(0, 1).reshape(1, 1, 2))  # a zero tap is still a connection for Flat
    x = t(5, -6, 7).reshape(1, 1, 3)
    got = attribute(conv, x, t(1, 2, 4, 8).reshape(1, 1, 4), Flat(stabilizer=1e-12))
    torch.testing.assert_close(got.flatten(), t(2, 3, 10), atol=1e-10, rtol=0)


def test_avgpool_norm_by_hand():
    from lrpcli.engine.rules import Norm

    # AvgPool1d(2), x = [1, 3, -2, 4]: z = [2, 1]; R_out = [4, -1]
    # R = [1 * 0.5 * 4/2, 3 * 0.5 * 4/2, -2 * 0.5 * (-1)/1, 4 * 0.5 * (-1)/1] = [1, 3, 1, -2]
    got = attribute(nn.AvgPool1d(2), t(1, 3, -2, 4).reshape(1, 1, 4), t(4, -1).reshape(1, 1, 2),
                    Norm(stabilizer=1e-12))
    torch.testing.assert_close(got.flatten(), t(1, 3, 1, -2), atol=1e-10, rtol=0)


def test_sum_norm_splits_by_contribution():
    import lrpcli
    from lrpcli.engine.composites import LayerMap
    from lrpcli.engine.rules import Norm

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.add = lrpcli.Sum()

        def forward(self, x):
            return self.add(x[:, :2], x[:, 2:])

    # a = [1, 3], b = [3, -1]: z = [4, 2]; R_out = [8, 1]
    # R_a = a * R / z = [2, 1.5];  R_b = [6, -0.5]
    x = t(1, 3, 3, -1)[None]
    got = lrpcli.attribute(Two(), x, target=t(8, 1)[None],
                           composite=LayerMap([(lrpcli.Sum, Norm(stabilizer=1e-12))]))
    torch.testing.assert_close(got[0], t(2, 1.5, 6, -0.5), atol=1e-10, rtol=0)


def test_sum_module_forward():
    import lrpcli

    s = lrpcli.Sum()
    assert isinstance(s, nn.Module)
    torch.testing.assert_close(s(t(1, 2), t(3, 4), t(5, 6)), t(9, 12))


def test_stabilizer_modes_by_hand():
    from lrpcli.engine.rules import Epsilon, Stabilizer, ZPlus

    layer = linear([[1, 1]])
    # x = [0.1, 0.1]: ZPlus den = 0.2. clip at 0.5: s = 0.5; R_out = 1 -> [0.1, 0.1] / 0.5 = [0.2, 0.2]
    got = attribute(layer, t(0.1, 0.1)[None], t(1)[None], ZPlus(stabilizer=Stabilizer(0.5, 'clip')))
    torch.testing.assert_close(got[0], t(0.2, 0.2), atol=1e-12, rtol=0)
    # sign mode 0.3 (given as a number): s = 0.5 as well
    got = attribute(layer, t(0.1, 0.1)[None], t(1)[None], ZPlus(stabilizer=0.3))
    torch.testing.assert_close(got[0], t(0.2, 0.2), atol=1e-12, rtol=0)
    # rms with 1.5, W = [[1, 1], [1, -1]], x = [0.3, 0.1]: ZPlus contributions P = [[0.3, 0.1], [0.3, 0]],
    # den = [0.4, 0.3]
    # rms(den) = sqrt((0.16 + 0.09) / 2) = 0.353553; s = den + 1.5 * 0.353553 = [0.930330, 0.830330]
    # R_out = [1, 1]: R = [0.3/0.930330 + 0.3/0.830330, 0.1/0.930330] = [0.683768, 0.107489]
    two = linear([[1, 1], [1, -1]])
    got = attribute(two, t(0.3, 0.1)[None], t(1, 1)[None], ZPlus(stabilizer=Stabilizer(1.5, 'rms')))
    torch.testing.assert_close(got[0], t(0.683768, 0.107489), atol=1e-6, rtol=0)
    # zero denominator: sign(0) = +1, so an Epsilon with z = 0 divides by +eps: x = [1, -1], W = [[1, 1]]
    # R = [1, -1] * R_out / eps = [0.5, -0.5] for R_out = 0.5, eps = 1
    got = attribute(layer, t(1, -1)[None], t(0.5)[None], Epsilon(1.0))
    torch.testing.assert_close(got[0], t(0.5, -0.5), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# constructor validation and repr


def test_alphabeta_requires_alpha_minus_beta_one():
    from lrpcli.engine.rules import AlphaBeta

    with pytest.raises(ValueError):
        AlphaBeta(alpha=2, beta=0.5)
    with pytest.raises(ValueError):
        AlphaBeta(alpha=1, beta=1)
    AlphaBeta(alpha=2, beta=1)
    AlphaBeta(alpha=1, beta=0)


def test_negative_parameters_raise():
    from lrpcli.engine.rules import Epsilon, Gamma

    with pytest.raises(ValueError):
        Gamma(-0.25)
    with pytest.raises(ValueError):
        Gamma(gamma=-1)
    with pytest.raises(ValueError):
        Epsilon(epsilon=-1)


def test_reprs_show_parameters():
    from lrpcli.engine.rules import AlphaBeta, Epsilon, Gamma, ZBox

    assert 'Gamma(gamma=0.25' in repr(Gamma(0.25))
    assert 'Epsilon(epsilon=0.25' in repr(Epsilon(0.25))
    r = repr(AlphaBeta(2, 1))
    assert r.startswith('AlphaBeta(') and 'alpha=2' in r and 'beta=1' in r
    r = repr(ZBox(-3, 3))
    assert r.startswith('ZBox(') and 'low=-3' in r and 'high=3' in r


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.Tanh(), nn.Sigmoid()],
                         ids=["relu", "leaky", "tanh", "sigmoid"])
def test_guided_backprop_by_hand(act):
    """(x > 0) max(R, 0) on the activation's input, whether the rule reads the output (ReLU-like) or the input."""
    import lrpcli
    from lrpcli.engine.composites import LayerMap
    from lrpcli.engine.rules import GuidedBackprop

    x = torch.tensor([[-1.0, 0.0, 2.0, 3.0]])
    upper = torch.tensor([[5.0, 7.0, -2.0, 4.0]])
    got = lrpcli.attribute(nn.Sequential(act), x, upper, composite=LayerMap([(nn.Module, GuidedBackprop())]))
    assert got.tolist() == [[0.0, 0.0, 0.0, 4.0]]
