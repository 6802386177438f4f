"""merge_batchnorm: fold each BatchNorm into the Linear/Conv/ConvTranspose that feeds it, temporarily.

Which layer feeds which BatchNorm is read from a real forward (the session's probe), not from the order in
which modules were registered. Nothing is written into the model's parameters: while merged, the layer runs
with weights computed from the original parameters on every call (so gradients reach the original conv and
BatchNorm parameters) and the BatchNorm runs as identity. On exit both get their own forward back.

Those weights are kept between calls (``MergedParams``) while every parameter and buffer they come from is
unchanged: rebuilding them is about nine small operations per layer, a large share of a small network's
forward. Where a parameter requires grad, the kept values enter the graph through ``MergedGrad``, whose backward
differentiates the merge itself, so gradients still reach the original parameters.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lrpcli.engine.canonizers.base import Canonizer
from lrpcli.engine.composites.layers import BATCHNORMS
from lrpcli.engine.functional_modules import MERGED_BATCHNORMS
from lrpcli.engine.layerops import CONV_TRANSPOSE_TYPES, CONV_TYPES, LINEAR_TYPES, tracing
from lrpcli.engine.paramcache import same_stamp, tensors_stamp
from lrpcli.engine.rules.batchnorm import scale_shift

if TYPE_CHECKING:  # pragma: no cover
    from lrpcli.engine.hooks import Probe, Session


def merged_params(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``layer`` followed by ``bn`` in eval mode, as differentiable functions of both."""
    return _merge(layer, bn, layer.weight, layer.bias, getattr(bn, "weight", None), getattr(bn, "bias", None))


def _merge(layer: nn.Module, bn: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
           bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``merged_params`` from the given parameters (the running statistics and eps read from ``bn``)."""
    scale, shift = scale_shift(bn, bn.running_mean, bn.running_var, (bn_weight, bn_bias))
    if isinstance(layer, CONV_TRANSPOSE_TYPES):
        groups = layer.groups
        in_ch, per_group = weight.shape[0], weight.shape[1]
        w = weight.view(groups, in_ch // groups, per_group, *weight.shape[2:])
        s = scale.view(groups, 1, per_group, *([1] * (weight.dim() - 2)))
        weight = (w * s).view_as(weight)
    else:
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    bias = shift if bias is None else bias * scale + shift
    return weight, bias


class MergedParams:
    """The merged weight and bias of one layer + BatchNorm pair, rebuilt only when a parameter or buffer of
    either changed (``paramcache.tensors_stamp``: replaced, moved, or updated in place)."""

    __slots__ = ("layer", "bn", "stamp", "values")

    def __init__(self, layer: nn.Module, bn: nn.Module) -> None:
        self.layer, self.bn = layer, bn
        self.stamp: tuple | None = None
        self.values: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer, bn = self.layer, self.bn
        if tracing():  # a capture computes them from the parameters in its graph
            return merged_params(layer, bn)
        stamp = tensors_stamp((layer, bn))
        if self.values is None or not same_stamp(self.stamp, stamp):
            with torch.no_grad():
                self.values = merged_params(layer, bn)
            self.stamp = stamp
        if torch.is_grad_enabled():
            params = (layer.weight, layer.bias, getattr(bn, "weight", None), getattr(bn, "bias", None))
            if any(p is not None and p.requires_grad for p in params):
                return MergedGrad.apply(self, *params)
        return self.values


class MergedGrad(torch.autograd.Function):
    """The kept merged weight and bias in the forward; in the backward, the gradient of the merge with respect
    to the parameters that require grad (computed again from them, so also under create_graph=True)."""

    @staticmethod
    def forward(ctx: Any, merged: MergedParams, *params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # (weight, bias) of the layer, then of the BatchNorm; None where absent
        ctx.merged = merged
        ctx.save_for_backward(*params)
        weight, bias = merged.values
        return weight.detach(), bias.detach()  # new tensors: autograd marks these, not the kept ones

    @staticmethod
    def backward(ctx: Any, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        merged: MergedParams = ctx.merged
        params = ctx.saved_tensors
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[1:]) if need]
        with torch.enable_grad():
            weight, bias = _merge(merged.layer, merged.bn, *params)
            grads = iter(torch.autograd.grad((weight, bias), wanted, (grad_weight, grad_bias), allow_unused=True,
                                             create_graph=torch.is_grad_enabled()))
        return (None, *(next(grads) if need else None for need in ctx.needs_input_grad[1:]))


def _merged_forward(layer: nn.Module, params: MergedParams):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight, bias = params()
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(layer, CONV_TYPES):
            return layer._conv_forward(x, weight, bias)
        output_size = args[0] if args else kwargs.get("output_size")
        n = x.dim() - 2
        padding = layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size, n,
                                        layer.dilation)
        return torch.convolution(x, weight, bias, list(layer.stride), list(layer.padding), list(layer.dilation),
                                 True, list(padding), layer.groups)

    return forward


def _identity(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def split_norm_act(bn: nn.Module) -> nn.Module | None:
    """A BatchNorm subclass with children (timm's ``BatchNormAct2d``: batch norm by ``F.batch_norm``, then its
    ``drop`` and ``act`` children) as ``Sequential(plain BatchNorm, drop, act)``: the plain BatchNorm shares the
    parameters and running statistics, so it merges into its conv or gets the BatchNorm rule like any other.
    None for anything else (a child other than ``drop``/``act``, or no plain BatchNorm class to stand in)."""
    children = dict(bn.named_children())
    if not children or not set(children) <= {"drop", "act"}:
        return None
    plain = next((c for c in type(bn).__mro__[1:] if c.__module__.startswith("torch.nn")
                  and issubclass(c, nn.modules.batchnorm._BatchNorm) and c is not nn.modules.batchnorm._BatchNorm),
                 None)
    if plain is None:
        return None
    norm = plain(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                 track_running_stats=False).to(device=getattr(bn.weight, "device", None))
    norm.weight, norm.bias = bn.weight, bn.bias
    norm.affine, norm.track_running_stats = bn.affine, bn.track_running_stats
    norm.running_mean, norm.running_var = bn.running_mean, bn.running_var
    norm.num_batches_tracked = getattr(bn, "num_batches_tracked", None)
    norm.train(bn.training)
    return nn.Sequential(norm, *(children[k] for k in ("drop", "act") if k in children))


class MergeBatchNorm(Canonizer):
    """Fold BatchNorms (eval mode, running statistics) into the layer whose output they normalise. BatchNorm +
    activation modules (timm's ``BatchNormAct2d``) are first split into a plain BatchNorm and their activation."""

    name = "merge_batchnorm"
    needs_probe = True

    def __init__(self) -> None:
        self.merged: list[tuple[nn.Module, nn.Module]] = []
        self._patched: list[tuple[nn.Module, object]] = []
        self._split: list[tuple[nn.Module, str, nn.Module]] = []

    def apply(self, model: nn.Module, session: Session) -> nn.Module:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, BATCHNORMS) and next(child.children(), None) is not None:
                    split = split_norm_act(child)
                    if split is not None:
                        parent._modules[name] = split
                        self._split.append((parent, name, child))
        if self._split:
            session.notes.append(f"merge_batchnorm: BatchNorm + activation modules split: "
                                 f"{type(self._split[0][2]).__name__} x{len(self._split)}")
        if isinstance(model, BATCHNORMS) and next(model.children(), None) is not None:
            return split_norm_act(model) or model
        return model

    def on_probe(self, probe: Probe, session: Session) -> None:
        producer = {c.output: c for c in probe.calls if c.output is not None}
        consumers = Counter(i for c in probe.calls for i in c.inputs)
        calls = Counter(id(c.module) for c in probe.calls)
        for call in probe.calls:
            if not isinstance(call.module, BATCHNORMS) or len(call.inputs) != 1:
                continue
            bn = call.module
            source = producer.get(call.inputs[0])
            if source is None or not isinstance(source.module, LINEAR_TYPES):
                session.notes.append(f"{call.name}: not merged (its input does not come from a linear layer)")
                continue
            layer = source.module
            if consumers[call.inputs[0]] != 1 or calls[id(layer)] != 1 or calls[id(bn)] != 1:
                session.notes.append(f"{call.name}: not merged into {source.name} (shared or reused tensors)")
                continue
            if bn.training or bn.running_mean is None or bn.running_var is None:
                session.notes.append(f"{call.name}: not merged (training mode or no running statistics)")
                continue
            if isinstance(layer, nn.Linear) and bn.running_mean.shape[0] != layer.out_features:
                continue
            self._merge(layer, bn, session)
            session.notes.append(f"{call.name}: merged into {source.name}")

    def _merge(self, layer: nn.Module, bn: nn.Module, session: Session) -> None:
        params = MergedParams(layer, bn)
        for module, new in ((layer, _merged_forward(layer, params)), (bn, _identity)):
            self._patched.append((module, module.__dict__.get("forward")))
            module.forward = new
        session.param_overrides[layer] = params
        session.param_sources[layer] = (bn,)
        self.merged.append((layer, bn))
        MERGED_BATCHNORMS.add(bn)

    def revert(self) -> None:
        for module, previous in reversed(self._patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        for _, bn in self.merged:
            MERGED_BATCHNORMS.discard(bn)
        self._patched.clear()
        self.merged.clear()
        for parent, name, original in reversed(self._split):
            parent._modules[name] = original
        self._split.clear()
