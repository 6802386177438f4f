"""Relevance inside the network: per-layer maps in the same backward, and MaxPool spread like average pooling."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import lrpcli
from lrpcli.engine.composites import LayerMap
from lrpcli.engine.rules import Gradient, MaxPoolAverage

pytestmark = pytest.mark.usefixtures("float64")


def _bias_free_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    return model


def test_layer_maps_shapes_order_and_conservation():
    model = _bias_free_resnet()
    x = torch.randn(2, 3, 64, 64)
    exact = {"zero_params": ["bias"], "epsilon": 1e-12, "stabilizer": lrpcli.Stabilizer(1e-9, "rms")}
    out, relevance, maps = lrpcli.attribute(model, x, 4, composite="epsilon_plus", canonizers=["resnet"],
                                            return_output=True, layers=["layer4", "layer2", "fc"], **exact)
    assert list(maps) == ["layer2", "layer4", "fc"]                       # forward order
    assert maps["layer4"].shape == (2, 512, 2, 2) and maps["layer2"].shape == (2, 128, 8, 8)
    seed = torch.zeros_like(out)
    seed[:, 4] = out[:, 4]
    torch.testing.assert_close(maps["fc"], seed)                          # a leaf: the relevance put in
    for name in ("layer4", "layer2"):                                     # containers: conserved on the way
        torch.testing.assert_close(maps[name].flatten(1).sum(1), out[:, 4], rtol=1e-6, atol=0)
    # the maps come from the same backward: the input relevance is unchanged by asking for them
    torch.testing.assert_close(relevance, lrpcli.attribute(model, x, 4, composite="epsilon_plus",
                                                           canonizers=["resnet"], **exact))


def test_unknown_layer_pattern_lists_names():
    with pytest.raises(ValueError, match="no module matches 'layr4'.*layer1"):
        lrpcli.attribute(_bias_free_resnet(), torch.randn(1, 3, 32, 32), 0, composite="epsilon_plus",
                         layers=["layr4"])


X = torch.tensor([[1.0, 2, 0, 4], [3, 4, 1, 1], [0, 0, 2, 2], [1, 1, 2, 2]], dtype=torch.float64).view(1, 1, 4, 4)
R = torch.tensor([[5.0, 3], [4, 1]], dtype=torch.float64).view(1, 1, 2, 2)


def test_maxpool_average_hand_computed():
    # each window's relevance in proportion to its inputs: R_i = x_i * R_j / sum(window j)
    expected = torch.tensor([[0.5, 1.0, 0.0, 2.0],     # window (0,0): x * 5/10; window (0,1): x * 3/6
                             [1.5, 2.0, 0.5, 0.5],
                             [0.0, 0.0, 0.25, 0.25],   # window (1,0): x * 4/2; window (1,1): x * 1/8
                             [2.0, 2.0, 0.25, 0.25]]).view(1, 1, 4, 4)
    got = lrpcli.attribute(nn.Sequential(nn.MaxPool2d(2)), X, R, composite=LayerMap([(nn.MaxPool2d,
                                                                                      MaxPoolAverage(1e-12))]))
    torch.testing.assert_close(got, expected)


def test_maxpool_winner_takes_all_hand_computed():
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 1] = 5.0   # the 4 in window (0,0)
    expected[0, 0, 0, 3] = 3.0   # the 4 in window (0,1)
    expected[0, 0, 3, 0] = 4.0   # window (1,0) = [[0, 0], [1, 1]]: the first maximum
    expected[0, 0, 2, 2] = 1.0   # window (1,1), all 2: the first
    got = lrpcli.attribute(nn.Sequential(nn.MaxPool2d(2)), X, R, composite=LayerMap([(nn.MaxPool2d, Gradient())]))
    torch.testing.assert_close(got, expected)


def test_composite_maxpool_option_reaches_the_pool():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    comp = lrpcli.composites.get("epsilon_plus", maxpool="average")
    with comp.context(model) as m:
        m(torch.randn(1, 1, 4, 4))
        rules = {a.name: a.rule for a in lrpcli.hooks.sessions_of(model)[0].coverage()}
    assert isinstance(rules["2"], MaxPoolAverage)
    a = lrpcli.attribute(model, X, 0, composite="epsilon_plus", maxpool="average")
    b = lrpcli.attribute(model, X, 0, composite="epsilon_plus")
    assert not torch.allclose(a, b)
