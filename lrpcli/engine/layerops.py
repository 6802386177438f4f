"""Linear layers as functions of substituted weights: f(x; W, b) and its input-vjp W^T v.

Rules that modify weights (ZPlus, Gamma, AlphaBeta, ZBox, Flat, WSquare) need the layer's operation with
other weights and inputs, and the transposed operation applied to a relevance-derived vector. Both are
expressed here once for Linear, ConvNd and ConvTransposeNd (any groups, stride, dilation, padding), so the
rules never depend on the layer type. The transposed operation is computed directly (no forward, no graph);
it stays differentiable for second-order use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_linear_layer(module: nn.Module) -> bool:
    """True for the layer types the parameter rules handle."""
    return isinstance(module, LINEAR_TYPES)


def bias_shape(module: nn.Module, z: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a bias vector over the output z (features last for Linear, channel dim 1 else)."""
    if isinstance(module, nn.Linear):
        return (z.shape[-1],)
    return (1, z.shape[1]) + (1,) * (z.dim() - 2)


_TRACING = {"on": False}


def tracing() -> bool:
    """True while ``lrpcli.export`` captures an attribution as a graph: the engine then takes no decision that
    reads a tensor's values or memory (sign checks, zero notes, batch slices, outputs kept as relu(z))."""
    return _TRACING["on"]


@contextlib.contextmanager
def traced() -> Iterator[None]:
    """Mark the block as a capture (``tracing()``); the general path of each shortcut runs instead."""
    previous, _TRACING["on"] = _TRACING["on"], True
    try:
        yield
    finally:
        _TRACING["on"] = previous


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by number of dimensions


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last (channels_last_3d) where ``t`` is laid out so, else the plain contiguous format.

    Buffers the rules allocate follow the layout of the tensors they meet: a channels-last model keeps its
    layout through the rules instead of mixing layouts in every element-wise pass (a mixed-layout pass is a
    strided gather, much slower than a contiguous one)."""
    channels_last = _CHANNELS_LAST.get(t.dim())
    if channels_last is not None and not t.is_contiguous() and t.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def empty_like_layout(t: torch.Tensor, shape: tuple[int, ...] | list[int], *, dtype: torch.dtype | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` in ``t``'s layout (``memory_format_of``), dtype and device unless
    given."""
    return torch.empty(tuple(shape), dtype=dtype or t.dtype, device=device or t.device,
                       memory_format=memory_format_of(t))


def _simple_padding(module: nn.Module) -> bool:
    return isinstance(module.padding, tuple) and getattr(module, "padding_mode", "zeros") == "zeros"


def _transpose_output_padding(module: nn.Module, x: torch.Tensor, z: torch.Tensor) -> list[int]:
    """The output_padding that reproduces z's spatial size (also when forward was given output_size)."""
    n = z.dim() - 2
    pads = []
    for d in range(n):
        base = (x.shape[2 + d] - 1) * module.stride[d] - 2 * module.padding[d]
        base += module.dilation[d] * (module.kernel_size[d] - 1) + 1
        pads.append(z.shape[2 + d] - base)
    return pads


#: the least output positions per sample (and channel) for which a pointwise convolution runs as a matrix product
POINTWISE_MIN_POSITIONS = 256


def _pointwise(module: nn.Module, positions: int, t: torch.Tensor) -> bool:
    """True for a 1x1 convolution (any stride, no padding, no dilation, no groups) on the CPU with at least
    POINTWISE_MIN_POSITIONS output positions: it is then a matrix product over the channels.

    On the CPU, oneDNN runs convolutions on NCHW tensors through reorders into its blocked layout; for the 1x1
    layers of a residual bottleneck a batched matrix product on the NCHW tensor as it is avoids those reorders
    (and strided 1x1 transposed ones are oneDNN's slowest case). Below POINTWISE_MIN_POSITIONS positions the
    reorders are cheap and oneDNN is as fast, so those stay with it. A channels-last tensor (``t``, the
    operand) needs no reorder and stays with oneDNN too.
    """
    # (not in a capture: baddbmm of a symbolic batch size has no meta function)
    return (not tracing() and t.device.type == "cpu" and positions >= POINTWISE_MIN_POSITIONS
            and isinstance(module, CONV_TYPES) and memory_format_of(t) == torch.contiguous_format
            and module.groups == 1 and _simple_padding(module) and all(k == 1 for k in module.kernel_size)
            and all(p == 0 for p in module.padding) and all(d == 1 for d in module.dilation))


def _every(module: nn.Module) -> tuple[slice, ...]:
    """Index of the input positions a strided 1x1 convolution reads."""
    return (slice(None), slice(None)) + tuple(slice(None, None, s) for s in module.stride)


def _output_positions(module: nn.Module, spatial: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-n // s) for n, s in zip(spatial, module.stride))


def forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            z: torch.Tensor) -> torch.Tensor:
    """The layer's operation on x with the given weight and bias (z only supplies the output shape)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, CONV_TYPES):
        spatial = _output_positions(module, tuple(x.shape[2:]))
        if _pointwise(module, math.prod(spatial), x):
            cols = x[_every(module)].flatten(2)
            w = weight.flatten(1)
            out = torch.matmul(w, cols) if bias is None else torch.baddbmm(
                bias.view(1, -1, 1), w.expand((x.shape[0],) + w.shape), cols)
            return out.view((x.shape[0], w.shape[0]) + spatial)
        return module._conv_forward(x, weight, bias)
    return torch.convolution(x, weight, bias, list(module.stride), list(module.padding), list(module.dilation),
                             True, _transpose_output_padding(module, x, z), module.groups)


def input_vjp(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, v: torch.Tensor,
              z: torch.Tensor) -> torch.Tensor:
    """W^T v: the vector-Jacobian product of x -> f(x; W) at v, shaped like x (x supplies only the shape)."""
    if isinstance(module, nn.Linear):
        return v.matmul(weight)
    if isinstance(module, CONV_TYPES) and _pointwise(module, math.prod(v.shape[2:]), v):
        w = weight.flatten(1)
        grad = torch.matmul(w.t(), v.flatten(2)).view((v.shape[0], w.shape[1]) + tuple(v.shape[2:]))
        if all(s == 1 for s in module.stride):
            return grad
        full = grad.new_zeros((v.shape[0],) + tuple(x.shape[1:]))
        full[_every(module)] = grad
        return full
    if isinstance(module, CONV_TYPES) and _simple_padding(module):
        shape = x if x.shape[0] == v.shape[0] else empty_like_layout(x, (v.shape[0],) + x.shape[1:])
        return torch.ops.aten.convolution_backward(
            v, shape, weight, None, list(module.stride), list(module.padding), list(module.dilation),
            False, [0] * (x.dim() - 2), module.groups, [True, False, False])[0]
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        shape = x if x.shape[0] == v.shape[0] else empty_like_layout(x, (v.shape[0],) + x.shape[1:])
        return torch.ops.aten.convolution_backward(
            v, shape, weight, None, list(module.stride), list(module.padding), list(module.dilation),
            True, _transpose_output_padding(module, x, z), module.groups, [True, False, False])[0]
    # padding given as a string or a non-zero padding mode: go through autograd on a fresh forward
    batch = v.shape[0]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xi = x.detach()[:1].expand((batch,) + x.shape[1:]).clone().requires_grad_(True)
        out = module._conv_forward(xi, weight, None)
        (grad,) = torch.autograd.grad(out, xi, v, create_graph=create_graph)
    return grad


def channel_dim(module: nn.Module) -> int:
    """The output dimension that holds the channels (features last for Linear, dim 1 for convolutions)."""
    return -1 if isinstance(module, nn.Linear) else 1


def weight_in_dim(module: nn.Module) -> int:
    """The weight dimension that holds the input channels (0 for transposed convolutions, 1 else)."""
    return 0 if isinstance(module, CONV_TRANSPOSE_TYPES) else 1


def pairable(module: nn.Module) -> bool:
    """True where W1^T a + W2^T b can be one transposed operation over the stacked weights [W1; W2].

    Convolutions without groups only: stacking the output channels of a grouped convolution would mix groups,
    and for Linear layers the stacked weight is a second copy of the largest tensors of a model (an image
    model's first dense layer) for no gain (one matrix product is already one call).
    """
    return isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES) and module.groups == 1


def pairable_outputs(module: nn.Module) -> bool:
    """True where ``pair_vjp`` serves W1^T a + W2^T b in one transposed operation: a ``pairable`` layer, or a
    convolution with groups (depthwise included), whose stacked pair runs as one transposed convolution with
    twice the groups (``pair_vjp``; zero padding given as numbers: other paddings go through autograd)."""
    return pairable(module) or isinstance(module, CONV_TYPES) and _simple_padding(module)


def pair_vjp(module: nn.Module, x: torch.Tensor, stacked: torch.Tensor, v: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
    """first^T a + second^T b for ``stacked`` = [first; second] (``stack_pair``) and v = [a; b] along the
    channels (``pairable_outputs`` modules).

    With groups, [first; second] is a layer with twice the groups: group k < g of it is first's group k, group
    g + k is second's group k, and the stacked v meets them in that order. Its transposed operation on twice the
    input channels gives first^T a and second^T b side by side, summed in one pass. An alternating layout
    (a0, b0, a1, b1, ... in each group) would need no sum, but it turns a depthwise convolution into one with two
    outputs per group, for which the CPU backends have no fast kernel (several times slower than the sum)."""
    if pairable(module):
        return input_vjp(module, x, stacked, v, z)
    shape = (v.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:])
    both = torch.ops.aten.convolution_backward(
        v, empty_like_layout(x, shape), stacked, None, list(module.stride), list(module.padding),
        list(module.dilation), False, [0] * (x.dim() - 2), 2 * module.groups, [True, False, False])[0]
    first, second = both.chunk(2, dim=1)
    return first + second  # fresh: an in-place sum would be a view holding the doubled tensor


def stack_pair(module: nn.Module, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[first; second] along the output channels: ``input_vjp`` with it and v = [a, b] (stacked along the
    channels) gives first^T a + second^T b in one transposed operation, half the passes of two calls and their
    sum (``pairable`` modules only)."""
    return torch.cat([first, second], dim=weight_out_dim(module))


def pair_of_weights(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An uninitialised stacked weight for ``stack_pair``'s layout and its two halves, for rules that compute
    the two weights straight into it (no separate tensors, no concatenation)."""
    dim = weight_out_dim(module)
    shape = list(weight.shape)
    shape[dim] *= 2
    stacked = weight.new_empty(shape)
    first, second = stacked.chunk(2, dim=dim)
    return stacked, first, second


def weight_out_dim(module: nn.Module) -> int:
    """The weight dimension that holds the output channels (1 for transposed convolutions, 0 else)."""
    return 1 if isinstance(module, CONV_TRANSPOSE_TYPES) else 0


def input_vjps(module: nn.Module, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, v: torch.Tensor,
               z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first^T v, second^T v): two weights, one vector. Stacked along the input channels where the layer allows
    (Linear, or no groups), it is one transposed operation with twice the input channels: for a first layer on
    3-channel images that is one call instead of two, each too narrow to use the cores well."""
    if isinstance(module, nn.Linear) or module.groups == 1:
        channels = channel_dim(module)  # inputs hold their channels where outputs do
        shape = list(x.shape)
        shape[0] = v.shape[0]
        shape[channels] *= 2
        both = input_vjp(module, empty_like_layout(x, shape), torch.cat([first, second], dim=weight_in_dim(module)),
                         v, z)
        first_vjp, second_vjp = both.chunk(2, dim=channels)
        return first_vjp, second_vjp
    return input_vjp(module, x, first, v, z), input_vjp(module, x, second, v, z)
