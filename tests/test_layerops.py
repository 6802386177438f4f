"""layerops: the layer operation and its transposed one with substituted weights, on every path they take."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpcli.engine import layerops

pytestmark = pytest.mark.usefixtures("float64")

POINTWISE = [  # (layer, per-sample input shape): 1x1 convolutions with at least 256 output positions
    (lambda: nn.Conv2d(3, 5, 1), (3, 16, 17)),
    (lambda: nn.Conv2d(4, 2, 1, stride=2), (4, 33, 35)),            # odd sizes: ceil(n / stride) outputs
    (lambda: nn.Conv1d(2, 3, 1, stride=3), (2, 800)),
    (lambda: nn.Conv3d(2, 3, 1, stride=(1, 2, 1)), (2, 4, 9, 16)),
]


def _native(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias, v: torch.Tensor):
    """The same two operations through the convolution itself and autograd."""
    xi = x.clone().requires_grad_(True)
    z = layer._conv_forward(xi, weight, bias)
    (vjp,) = torch.autograd.grad(z, xi, v)
    return z.detach(), vjp


@pytest.mark.parametrize("factory,shape", POINTWISE)
@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_matrix_products_equal_the_convolution(factory, shape, with_bias):
    torch.manual_seed(0)
    layer = factory()
    x = torch.randn((3,) + shape)
    weight = torch.randn_like(layer.weight)
    bias = torch.randn_like(layer.bias) if with_bias else None
    expected_z = layer._conv_forward(x, weight, bias)
    assert layerops._pointwise(layer, expected_z[0, 0].numel(), x)  # the matrix-product path is taken
    z = layerops.forward(layer, x, weight, bias, expected_z)
    v = torch.randn_like(z)
    native_z, native_vjp = _native(layer, x, weight, bias, v)
    torch.testing.assert_close(z, native_z, rtol=0, atol=1e-12)
    torch.testing.assert_close(layerops.input_vjp(layer, x, weight, v, z), native_vjp, rtol=0, atol=1e-12)
    # a vector stacked along the batch (rules do that) gives each part's vjp; x supplies only the shape
    both = layerops.input_vjp(layer, x.to("meta"), weight, torch.cat([v, 2 * v]), z)
    torch.testing.assert_close(both, torch.cat([native_vjp, 2 * native_vjp]), rtol=0, atol=1e-12)


def test_pointwise_path_is_for_plain_1x1_convolutions_with_enough_positions():
    cpu = torch.zeros(1, 4, 16, 16)
    many = layerops.POINTWISE_MIN_POSITIONS
    assert layerops._pointwise(nn.Conv2d(4, 4, 1, stride=2), many, cpu)
    assert not layerops._pointwise(nn.Conv2d(4, 4, 1), many - 1, cpu)           # small maps stay with oneDNN
    assert not layerops._pointwise(nn.Conv2d(4, 4, 1), many, cpu.to("meta"))  # CPU only
    # channels-last tensors need no reorder: oneDNN takes them as they are
    assert not layerops._pointwise(nn.Conv2d(4, 4, 1), many, cpu.contiguous(memory_format=torch.channels_last))
    for other in (nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1, padding=1), nn.Conv2d(4, 4, 1, groups=2),
                  nn.Conv2d(4, 4, 1, dilation=2), nn.Conv2d(4, 4, 1, padding="same"),
                  nn.ConvTranspose2d(4, 4, 1), nn.Linear(4, 4)):
        assert not layerops._pointwise(other, many, cpu), other


def test_buffers_follow_the_layout_of_the_tensor_they_are_made_for():
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    x4, x5 = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5, 6)
    assert layerops.memory_format_of(x4) == torch.contiguous_format
    assert layerops.memory_format_of(x4.contiguous(memory_format=cl)) == cl
    assert layerops.memory_format_of(x5.contiguous(memory_format=cl3)) == cl3
    assert layerops.memory_format_of(torch.zeros(2, 1, 4, 5)) == torch.contiguous_format  # both at once: plain
    assert layerops.memory_format_of(x4.transpose(2, 3)) == torch.contiguous_format  # neither: plain
    made = layerops.empty_like_layout(x5.contiguous(memory_format=cl3), (4, 6, 4, 5, 6), dtype=torch.float64)
    assert made.shape == (4, 6, 4, 5, 6) and made.dtype == torch.float64
    assert made.is_contiguous(memory_format=cl3) and not made.is_contiguous()
    assert layerops.empty_like_layout(x4.to("meta"), (1, 3, 4, 5)).is_meta  # shape stand-ins stay on meta
