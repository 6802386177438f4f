"""The BatchNorm rule: BatchNorms that merge_batchnorm cannot fold (DenseNet's, after a concatenation) keep their
scale and shift under ``composite: auto``.

By hand on one layer; on a small torchvision DenseNet against a dense reference: the same network with every
such BatchNorm written as the depthwise 1x1 convolution it is (weight a, bias b), that convolution under the
Epsilon rule with the same stabilizer. float64 throughout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine.composites import get
from lrpcli.engine.functional_modules import MERGED_BATCHNORMS
from lrpcli.engine.rules import BatchNormRule, Epsilon, Pass, Stabilizer, make

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(bn: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=DT))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=DT) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=gen, dtype=DT))
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=DT) * 0.5)


def _one_layer(rule, bn: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    with lrpcli.composites.LayerMap([(nn.BatchNorm2d, rule)]).context(bn) as m:
        xi = x.clone().requires_grad_()
        return torch.autograd.grad(m(xi), xi, r)[0]


def test_one_batchnorm_by_hand():
    """R_i = a x_i R_i / (a x_i + b + eps sign(.)), a = w / sqrt(var + eps_bn), b = beta - mean a; with
    zero_params [bias] the shift is out: R_i = R_i (Pass)."""
    bn = nn.BatchNorm2d(2, eps=0.0).to(DT).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([3.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.5, 2.0]))
    x = torch.tensor([[[[2.0]], [[1.0]]]], dtype=DT)      # a = [1.5, -2], b = [-1, -2]
    r = torch.tensor([[[[0.8]], [[-0.3]]]], dtype=DT)
    eps = 1e-3
    # channel 0: z = 1.5 * 2 - 1 = 2, R = 3 * 0.8 / (2 + eps); channel 1: z = -2 - 2 = -4, R = -2 * -0.3 / (-4 - eps)
    want = torch.tensor([[[[3.0 * 0.8 / (2 + eps)]], [[-2.0 * -0.3 / (-4 - eps)]]]], dtype=DT)
    got = _one_layer(BatchNormRule(Stabilizer(eps)), bn, x, r)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    without_shift = _one_layer(BatchNormRule(Stabilizer(eps), zero_params=["bias"]), bn, x, r)
    ratio = torch.tensor([3 / (3 + eps), 2 / (2 + eps)], dtype=DT).view(1, 2, 1, 1)
    torch.testing.assert_close(without_shift, r * ratio, rtol=0, atol=1e-12)


@pytest.mark.parametrize("training", [False, True], ids=["running_stats", "batch_stats"])
def test_batchnorm_rule_is_epsilon_on_the_equivalent_depthwise_conv(training):
    """Every position and channel, eval (running statistics) and training mode (batch statistics)."""
    gen = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(3).to(DT)
    _randomise(bn, gen)
    bn.train(training)
    x = torch.randn(4, 3, 5, 5, dtype=DT, generator=gen)
    r = torch.randn(4, 3, 5, 5, dtype=DT, generator=gen)
    stab = Stabilizer(1e-6, "rms")
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    a = bn.weight.detach() / torch.sqrt(var + bn.eps)
    conv = nn.Conv2d(3, 3, 1, groups=3).to(DT)
    with torch.no_grad():
        conv.weight.copy_(a.view(3, 1, 1, 1))
        conv.bias.copy_(bn.bias - mean * a)
    with lrpcli.composites.LayerMap([(nn.Conv2d, Epsilon(1e-6, stabilizer=stab))]).context(conv) as m:
        xi = x.clone().requires_grad_()
        want = torch.autograd.grad(m(xi), xi, r)[0]
    torch.testing.assert_close(_one_layer(BatchNormRule(stab), bn, x, r), want, rtol=1e-10, atol=1e-12)


def test_merged_batchnorm_passes_through():
    """Folded into the conv before it, the BatchNorm is the identity: the rule hands relevance on and keeps
    nothing."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).to(DT).eval()
    _randomise(model[1], gen)
    x = torch.randn(2, 2, 6, 6, dtype=DT, generator=gen)
    rules = [(nn.Conv2d, Epsilon()), (nn.BatchNorm2d, BatchNormRule())]
    with lrpcli.composites.LayerMap(rules).context(model, canonizers=["merge_batchnorm"]) as m:
        xi = x.clone().requires_grad_()
        out = m(xi)
        got = torch.autograd.grad(out, xi, out)[0]
        assert model[1].forward(out) is out and BatchNormRule().reads_of(model[1]) == ()
    with lrpcli.composites.LayerMap([(nn.Conv2d, Epsilon()), (nn.BatchNorm2d, Pass())]).context(
            model, canonizers=["merge_batchnorm"]) as m:
        xi = x.clone().requires_grad_()
        out = m(xi)
        want = torch.autograd.grad(out, xi, out)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert BatchNormRule().reads_of(model[1]) == ("inputs", "output")  # unmerged again after the context
    assert make("batch_norm") == BatchNormRule()


def _small_densenet() -> nn.Module:
    from torchvision.models.densenet import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)
    model = model.to(DT).eval()
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise(m, gen)
    return model


def _as_depthwise(bn: nn.BatchNorm2d) -> nn.Conv2d:
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features).to(DT)
    with torch.no_grad():
        conv.weight.copy_(a.view(-1, 1, 1, 1))
        conv.bias.copy_(bn.bias - bn.running_mean * a)
    return conv


def _auto(model: nn.Module, x: torch.Tensor, overrides=None) -> tuple[torch.Tensor, list]:
    comp = get("auto", overrides=overrides)
    with comp.context(model, canonizers=["auto"]) as m:
        xi = x.clone().requires_grad_()
        out = m(xi)
        seed = torch.zeros_like(out)
        seed[:, 2] = out[:, 2]
        relevance = torch.autograd.grad(out, xi, seed)[0]
        coverage = [(a.name, a.rule) for a in lrpcli.hooks.sessions_of(m)[0].coverage()
                    if a.calls and a.module not in MERGED_BATCHNORMS]
    return relevance, coverage


def test_densenet_post_concatenation_batchnorms_match_a_dense_reference():
    """DenseNet: norm1 of each dense layer, the transitions' norm and norm5 follow a concatenation and cannot be
    merged. Under auto they get the BatchNorm rule, and the relevance equals that of the same network with those
    BatchNorms written as depthwise convolutions under Epsilon (same rms stabilizer); Pass (scale and shift
    ignored) gives a measurably different answer."""
    model = _small_densenet()
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(4))
    got, coverage = _auto(model, x)
    unmerged = [name for name, rule in coverage if isinstance(rule, BatchNormRule)]
    assert unmerged == ["features.denseblock1.denselayer1.norm1", "features.denseblock1.denselayer2.norm1",
                        "features.transition1.norm", "features.denseblock2.denselayer1.norm1",
                        "features.denseblock2.denselayer2.norm1", "features.norm5"]

    reference = copy.deepcopy(model)
    for name in unmerged:
        parent, child = name.rsplit(".", 1)
        setattr(reference.get_submodule(parent), child, _as_depthwise(reference.get_submodule(name)))
    torch.testing.assert_close(reference(x), model(x), rtol=1e-12, atol=1e-12)
    epsilon = Epsilon(1e-6, stabilizer=Stabilizer(1e-6, "rms"))
    want, _ = _auto(reference, x, overrides=[(name, epsilon) for name in unmerged])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)

    passed, _ = _auto(model, x, overrides=[(nn.BatchNorm2d, Pass())])
    assert (passed - got).abs().sum() > 0.05 * got.abs().sum()


def test_config_gives_the_rule_to_any_composite(tmp_path):
    """`{type: BatchNorm2d, rule: batchnorm}` in a config; the composite's zero_params reach it."""
    from lrpcli.explainer.build import composite_kwargs, load_config

    path = tmp_path / "densenet.yaml"
    path.write_text("model: {name: densenet121}\ncanonizers: [densenet]\ncomposite:\n  name: epsilon_plus\n"
                    "  zero_params: [bias]\n  rules:\n    - {type: BatchNorm2d, rule: batchnorm}\n")
    kwargs = composite_kwargs(load_config(path))
    assert kwargs["overrides"] == [(nn.BatchNorm2d, BatchNormRule(zero_params=["bias"]))]
