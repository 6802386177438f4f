"""Attributors: exact expectations on linear models, equivalences, and batching that changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpcli
from lrpcli.explainer import attributors as A

pytestmark = pytest.mark.usefixtures("float64")


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_gradient_and_input_x_gradient_plain():
    model = small_cnn()
    x = torch.randn(2, 2, 4, 4)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    out, g = A.gradient(model, x, 1)
    torch.testing.assert_close(g, grad)
    torch.testing.assert_close(out, model(x))
    _, ixg = A.input_x_gradient(model, x, 1)
    torch.testing.assert_close(ixg, grad * x)


def test_gradient_with_composite_is_lrp():
    model = small_cnn()
    x = torch.randn(2, 2, 4, 4)
    _, relevance = A.gradient(model, x, 1, composite="epsilon_plus")
    torch.testing.assert_close(relevance, lrpcli.attribute(model, x, 1, composite="epsilon_plus"))


def test_integrated_gradients_exact_on_linear_model_and_complete():
    model = linear_model()
    x = torch.randn(2, 2, 4, 4)
    w = model[1].weight[2].view(2, 4, 4)
    _, ig = A.integrated_gradients(model, x, 2, n_iter=1)
    torch.testing.assert_close(ig, x * w)  # (x - 0) * gradient, the gradient is constant
    smooth = small_cnn()
    _, ig = A.integrated_gradients(smooth, x, 0, n_iter=64)
    completeness = smooth(x)[:, 0] - smooth(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(ig.flatten(1).sum(1), completeness, rtol=1e-3, atol=1e-6)


def test_smoothgrad_without_noise_is_gradient_and_batching_changes_nothing():
    model = small_cnn()
    x = torch.randn(3, 2, 4, 4)
    _, grad = A.gradient(model, x, 0)
    _, sg = A.smoothgrad(model, x, 0, noise_level=0.0, n_iter=5)
    torch.testing.assert_close(sg, grad)
    _, big = A.smoothgrad(model, x, 0, n_iter=7, seed=3)
    _, tiny = A.smoothgrad(model, x, 0, n_iter=7, seed=3, memory_budget=1)   # one copy per forward
    torch.testing.assert_close(big, tiny, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(big, grad)


def test_occlusion_equals_input_x_weight_on_linear_model():
    model = linear_model()
    x = torch.randn(2, 2, 4, 4)
    w = model[1].weight[1].view(2, 4, 4)
    _, occ = A.occlusion(model, x, 1, window=1, fill=0.0)
    # a 1x1 window over all channels drops the sum over channels of x * w at that pixel
    torch.testing.assert_close(occ, (x * w).sum(1, keepdim=True).expand_as(x))
    _, a = A.occlusion(model, x, 1, window=(2, 2), stride=(1, 1))
    _, b = A.occlusion(model, x, 1, window=(2, 2), stride=(1, 1), memory_budget=1)
    torch.testing.assert_close(a, b)


def test_attributors_accept_tensor_targets():
    model = small_cnn()
    x = torch.randn(2, 2, 4, 4)
    out = model(x)
    onehot = torch.zeros_like(out)
    onehot[:, 2] = 1.0
    for name in ("gradient", "smoothgrad", "integrated_gradients"):
        _, by_index = A.ATTRIBUTORS[name](model, x, 2)
        _, by_tensor = A.ATTRIBUTORS[name](model, x, onehot)
        torch.testing.assert_close(by_index, by_tensor, msg=name)
