"""The vocabulary of the ``functional`` canonizer: which torch functions and tensor methods are which operation.

fx records an operation as a function (``torch.add``, ``operator.mul``) or a method name (``"add_"``); these tables
name every spelling of one operation together, so the rewriter asks one question per node ("is it an addition?").
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__"}
SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__", "__isub__"}
DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__"}
MATMUL = {operator.matmul: torch.matmul, torch.matmul: torch.matmul, torch.bmm: torch.bmm,
          "matmul": torch.matmul, "bmm": torch.bmm}
SOFTMAX = {F.softmax, torch.softmax, "softmax"}
ACTIVATIONS: dict[Any, type[nn.Module]] = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, F.relu6: nn.ReLU6, F.gelu: nn.GELU, F.silu: nn.SiLU,
    F.mish: nn.Mish, F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid, torch.sigmoid: nn.Sigmoid,
    F.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid, torch.tanh: nn.Tanh, F.tanh: nn.Tanh, "tanh": nn.Tanh,
    F.elu: nn.ELU, F.leaky_relu: nn.LeakyReLU,
}
GATE_SOURCES = (nn.Sigmoid, nn.Hardsigmoid)
POOLS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d,
         F.avg_pool3d}
MEAN = {torch.mean, "mean"}
MAXPOOLS = {F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d, F.max_pool3d: nn.MaxPool3d}
MAXPOOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
#: operations whose gradient moves elements without changing them (or only on shapes, dtypes, devices)
ROUTING = {
    operator.getitem, getattr, torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.split, torch.chunk, torch.unbind, torch.roll, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.flip, F.pad, F.dropout, torch.zeros_like, torch.ones_like, torch._assert,
    "view", "reshape", "permute", "transpose", "flatten", "contiguous", "split", "chunk", "unbind", "squeeze",
    "unsqueeze", "expand", "expand_as", "repeat", "roll", "narrow", "select", "flip", "to", "type", "float",
    "double", "half", "clone", "size", "dim", "numel", "masked_fill", "unflatten", "movedim", "view_as",
    "reshape_as", "detach", "__getitem__", "t", "swapaxes", "swapdims", torch.swapaxes, torch.swapdims,
    torch.movedim,
}
try:  # torchvision's fx-wrapped padding for Swin's patch merging: pad and strided slices, pure routing
    from torchvision.models.swin_transformer import _patch_merging_pad

    ROUTING.add(_patch_merging_pad)
except Exception:  # pragma: no cover - torchvision missing or changed
    pass
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad"}
