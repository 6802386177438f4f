"""Canonizers: BatchNorm merging by real data flow, exact revert, gradients while merged, residual sums."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.engine.composites import LayerMap
from lrpcli.engine.rules import Epsilon, Norm, Pass

pytestmark = pytest.mark.usefixtures("float64")


class Shuffled(nn.Module):
    """Modules registered in one order, applied in another: conv_b feeds bn_a, conv_a feeds bn_b."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(5),
                                     nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Linear(5, 2), nn.BatchNorm1d(2)])

    def forward(self, x):
        bn_a, conv_a, bn_b, conv_b, relu, fc, bn_c = self.layers
        x = relu(bn_a(conv_a(x)))
        x = relu(bn_b(conv_b(x)))
        return bn_c(fc(x.mean((2, 3))))


def randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def merged_session(model):
    comp = LayerMap([((nn.Conv2d, nn.Linear), Epsilon()), ((nn.ReLU, nn.BatchNorm2d, nn.BatchNorm1d), Pass())])
    return comp.context(model, canonizers=["merge_batchnorm"])


def test_merge_follows_forward_order_and_keeps_output():
    torch.manual_seed(0)
    model = Shuffled().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with merged_session(model) as m:
        out = m(x)
        session = lrpcli.hooks.sessions_of(model)[0]
        # BatchNorm acts as identity while merged, without touching eps
        probe = torch.randn(2, 4, 6, 6)
        assert torch.equal(model.layers[0](probe), probe) and model.layers[0].eps == 1e-5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-12)
    assert "layers.0: merged into layers.1" in session.notes
    assert "layers.2: merged into layers.3" in session.notes
    assert "layers.6: merged into layers.5" in session.notes
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model(x), expected)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_gradients_reach_original_parameters_while_merged():
    torch.manual_seed(1)
    model = Shuffled().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6)
    with merged_session(model) as m, lrpcli.rules_off(model):
        m(x).sum().backward()
    merged = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(merged[name], p.grad, rtol=1e-6, atol=1e-10, msg=name)
    assert merged["layers.0.weight"].abs().sum() > 0   # BatchNorm parameters get gradients


def test_relevance_loss_trains_batchnorm_parameters_with_canonizers_active():
    torch.manual_seed(2)
    model = Shuffled().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6)
    before = model.layers[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    relevance = lrpcli.attribute(model, x, 1, composite="epsilon_plus", canonizers=["merge_batchnorm"],
                                 create_graph=True)
    loss = relevance.pow(2).sum()
    loss.backward()
    assert model.layers[0].weight.grad is not None and model.layers[0].weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(model.layers[0].weight.detach(), before)


def test_bn_not_fed_by_linear_layer_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    randomize_bn(model)
    x = torch.randn(1, 3, 5, 5)
    with merged_session(model) as m:
        out = m(x)
        notes = lrpcli.hooks.sessions_of(model)[0].notes
    torch.testing.assert_close(out, model(x))
    assert any(n.startswith("2: not merged") for n in notes)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))    # residual written in forward
        return self.out(h)


def test_generic_residual_canonizer_splits_by_contribution():
    torch.manual_seed(3)
    model = Residual()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    x = torch.randn(3, 4)
    comp = LayerMap([(nn.Linear, Epsilon(1e-12)), (lrpcli.Sum, Norm(1e-12))])
    plain = lrpcli.attribute(model, x, 0, composite=comp)
    summed = lrpcli.attribute(model, x, 0, composite=comp, canonizers=["residual"])
    logit = model(x)[:, 0]
    # with the Sum module relevance is conserved; copied to both branches it is not
    torch.testing.assert_close(summed.sum(1), logit, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(plain.sum(1), logit, rtol=1e-3)
    assert not any(isinstance(m, lrpcli.Sum) for m in model.modules())


def test_untraceable_model_names_the_class():
    class Untraceable(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x + x
            return x

    with pytest.raises(ValueError, match="cannot trace Untraceable"):
        lrpcli.attribute(Untraceable(), torch.randn(1, 3), 0, composite="epsilon_plus", canonizers=["residual"])


def test_unknown_canonizer_lists_valid_ones():
    with pytest.raises(ValueError, match="valid canonizers: .*resnet"):
        lrpcli.attribute(nn.Linear(2, 2), torch.randn(1, 2), 0, composite="epsilon_plus", canonizers=["resnt"])


def test_probe_leaves_training_mode_models_untouched():
    torch.manual_seed(4)
    model = Shuffled().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged_session(model) as m:
        m(torch.randn(3, 3, 6, 6))
        notes = lrpcli.hooks.sessions_of(model)[0].notes
    assert model.training and all(m.training for m in model.modules())
    assert any("not merged (training mode" in n for n in notes)
    # only the real forward (train mode) updated the statistics, the probe did not
    assert int(model.layers[0].num_batches_tracked) == int(before["layers.0.num_batches_tracked"]) + 1
