"""The session's cache of parameter-derived tensors (``hooks.ParamCache``): reused values give the very bits a
rebuild gives, and any change of the parameters, buffers or input size drops them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpcli.engine.composites import get
from lrpcli.engine.rules import plain
from lrpcli.explainer.explainer import Explainer

DT = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 1), nn.Flatten(), nn.LazyLinear(5),
    ).to(DT)
    model(torch.zeros(1, 3, 8, 8, dtype=DT))  # materialise the lazy layer
    for bn in (model[1], model[4]):
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _fresh(model: nn.Module, x: torch.Tensor, composite: str) -> torch.Tensor:
    with Explainer(model, get(composite), canonizers=["auto"]) as explainer:
        return explainer(x).relevance


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int64), b.view(torch.int64))


@pytest.mark.parametrize("composite", ["auto", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_reused_values_give_the_same_bits(composite):
    model, x = _model(), torch.randn(2, 3, 8, 8, dtype=DT)
    with Explainer(model, get(composite), canonizers=["auto"]) as explainer:
        first = explainer(x).relevance
        cache = explainer.session.param_cache
        assert cache.used > 0 and any(cache.entries.values())  # values were kept ...
        second = explainer(x).relevance  # ... and reused
    assert _bits_equal(first, second)
    with plain():
        slow = _fresh(model, x, composite)
    torch.testing.assert_close(second, slow, atol=1e-12, rtol=0)


@pytest.mark.parametrize("change", ["conv_weight", "bn_running_var", "bn_bias", "replaced_weight"])
def test_a_changed_parameter_or_buffer_drops_the_values(change):
    model, x = _model(), torch.randn(2, 3, 8, 8, dtype=DT)
    with Explainer(model, get("epsilon_gamma_box"), canonizers=["auto"]) as explainer:
        before = explainer(x).relevance
        with torch.no_grad():
            if change == "conv_weight":
                model[3].weight.mul_(-1.5)
            elif change == "bn_running_var":
                model[4].running_var.mul_(4.0)
            elif change == "bn_bias":  # the first layer's merged bias: ZBox's bound terms
                model[1].bias.add_(0.5)
            else:
                model[6].weight = nn.Parameter(model[6].weight.detach() * -2.0)
        after = explainer(x).relevance
    assert not torch.equal(before, after)
    assert _bits_equal(after, _fresh(model, x, "epsilon_gamma_box"))


def test_another_input_size_drops_the_values():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(DT).eval()
    small, large = torch.randn(2, 3, 6, 6, dtype=DT), torch.randn(2, 3, 9, 7, dtype=DT)
    with Explainer(model, get("epsilon_gamma_box"), canonizers=["auto"]) as explainer:
        explainer(small)
        got = explainer(large).relevance  # ZBox's bound terms follow the input's size
    assert _bits_equal(got, _fresh(model, large, "epsilon_gamma_box"))


def test_nothing_is_kept_on_the_plain_path_or_for_second_order():
    model, x = _model(), torch.randn(2, 3, 8, 8, dtype=DT)
    with plain(), Explainer(model, get("epsilon_gamma_box"), canonizers=["auto"]) as explainer:
        explainer(x)
        assert explainer.session.param_cache.used == 0
    with Explainer(model, get("epsilon_gamma_box"), canonizers=["auto"], create_graph=True) as explainer:
        explainer(x)
        assert explainer.session.param_cache.used == 0


def test_the_budget_bounds_what_is_kept(monkeypatch):
    from lrpcli.engine import hooks

    monkeypatch.setattr(hooks.ParamCache, "BUDGET_BYTES", 2000)
    model, x = _model(), torch.randn(2, 3, 8, 8, dtype=DT)
    with Explainer(model, get("epsilon_gamma_box"), canonizers=["auto"]) as explainer:
        first = explainer(x).relevance
        used = explainer.session.param_cache.used
        second = explainer(x).relevance
    assert 0 < used <= 2000
    assert _bits_equal(first, second)
