"""merge_batchnorm keeps the merged weights between forwards: rebuilt on any change, gradients still flow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine.canonizers.batchnorm import MergedParams
from lrpcli.engine.composites import LayerMap
from lrpcli.engine.layercall import LayerCall
from lrpcli.engine.recorder import Recorder
from lrpcli.engine.rules import BatchNormRule, Epsilon, Pass

pytestmark = pytest.mark.usefixtures("float64")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 36, 2)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def session_of(model: nn.Module):
    comp = LayerMap([((nn.Conv2d, nn.Linear), Epsilon()), ((nn.ReLU, nn.BatchNorm2d, nn.Flatten), Pass())])
    return comp.context(model, canonizers=["merge_batchnorm"])


CHANGES = {
    "conv weight": lambda m: m[0].weight.mul_(1.5),
    "conv bias": lambda m: m[0].bias.add_(0.25),
    "bn weight": lambda m: m[4].weight.mul_(-0.5),
    "bn bias": lambda m: m[4].bias.add_(1.0),
    "running_mean": lambda m: m[1].running_mean.add_(0.5),
    "running_var": lambda m: m[4].running_var.mul_(3.0),
    "load_state_dict": lambda m: m.load_state_dict({k: v * 0.5 if v.is_floating_point() else v
                                                    for k, v in m.state_dict().items()}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_merged_output_follows_in_place_changes(change):
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    with session_of(model) as m:
        m(x)
        kept = lrpcli.hooks.sessions_of(model)[0].param_overrides[model[0]]
        assert isinstance(kept, MergedParams)
        first = kept.values
        m(x)
        assert kept.values is first  # unchanged parameters: nothing rebuilt
        with torch.no_grad():
            CHANGES[change](model)
        out = m(x)
        reference = copy.deepcopy(model)  # its own forward: the unmerged BatchNorms
    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    assert not torch.equal(out, small_model()(x))  # the change took effect


def test_merged_output_follows_dtype_change():
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    with session_of(model) as m:
        m(x)
        model.float()
        out = m(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x.float()), rtol=1e-5, atol=1e-6)


def test_gradients_reach_parameters_through_kept_weights():
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    with session_of(model) as m, lrpcli.rules_off(model):
        m(x)  # builds the kept weights; the next forward reuses them
        m(x).pow(2).sum().backward()
    merged = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(merged[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert merged["4.weight"].abs().sum() > 0 and merged["1.bias"].abs().sum() > 0


def test_no_parameter_requires_grad_uses_kept_weights_as_they_are():
    model = small_model().requires_grad_(False)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with session_of(model) as m, lrpcli.rules_off(model):
        m(x)
        kept = lrpcli.hooks.sessions_of(model)[0].param_overrides[model[0]]
        assert kept() is kept.values and kept.values[0].grad_fn is None
        (grad,) = torch.autograd.grad(m(x).sum(), x)
    x2 = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(x2).sum(), x2)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_merged_batchnorm_gets_no_node_and_the_same_relevance(monkeypatch):
    """BatchNormRule on a merged BatchNorm is the identity: the hook adds no node, as for Pass on an identity
    (a recorder keeps the LayerCall, and the relevance is the same)."""
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    comp = LayerMap([((nn.Conv2d, nn.Linear), Epsilon()), (nn.BatchNorm2d, BatchNormRule()),
                     ((nn.ReLU, nn.Flatten), Pass())])
    seen: list[str] = []
    original = LayerCall.__init__

    def init(self, session, module, *args, **kwargs):
        seen.append(type(module).__name__)
        original(self, session, module, *args, **kwargs)

    monkeypatch.setattr(LayerCall, "__init__", init)
    results, modules = [], []
    for recorder in (None, Recorder()):
        seen.clear()
        with comp.context(model, canonizers=["merge_batchnorm"], recorder=recorder) as m:
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            results.append(torch.autograd.grad(out, xi, torch.ones_like(out))[0])
        modules.append(list(seen))
    assert "BatchNorm2d" not in modules[0] and modules[1].count("BatchNorm2d") == 2
    assert torch.equal(results[0], results[1]) and results[0].abs().sum() > 0
