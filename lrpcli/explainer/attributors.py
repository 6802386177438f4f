"""Attributors beyond the single backward: input x gradient, SmoothGrad, Integrated Gradients, Occlusion.

Each returns ``(output, attribution)``, takes the same target forms as ``lrpcli.attribute`` and works with or
without a composite: with one, "gradient" means the signal the rules propagate (relevance for relevance
composites). Each is one ``Explainer`` call (``lrpcli.explainer.explainer``); the algorithms are in
``lrpcli.explainer.methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lrpcli.explainer.explainer import METHODS, Explainer, Target, resolve_composite
from lrpcli.explainer.methods import DEFAULT_BUDGET

__all__ = ["ATTRIBUTORS", "DEFAULT_BUDGET", "METHODS", "gradient", "input_x_gradient", "integrated_gradients",
           "occlusion", "smoothgrad"]
Result = tuple[torch.Tensor, torch.Tensor]


def _run(model: nn.Module, x: torch.Tensor, target: Target, composite: Any, canonizers: Sequence[Any] | None,
         method: str, params: dict[str, Any], **options: Any) -> Result:
    comp = resolve_composite(composite, **params)
    result = Explainer(model, comp, canonizers, method=method, target=target, **options)(x)
    return result.output, result.relevance


def gradient(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
             canonizers: Sequence[Any] | None = None, **params: Any) -> Result:
    """The (modified) gradient: plain without a composite, LRP relevance with one."""
    return _run(model, x, target, composite, canonizers, "gradient", params)


def input_x_gradient(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
                     canonizers: Sequence[Any] | None = None, **params: Any) -> Result:
    """x times the (modified) gradient."""
    return _run(model, x, target, composite, canonizers, "input_x_gradient", params)


def smoothgrad(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
               canonizers: Sequence[Any] | None = None, *, noise_level: float = 0.1, n_iter: int = 20,
               seed: int | None = 0, memory_budget: int = DEFAULT_BUDGET, **params: Any) -> Result:
    """Mean signal over ``n_iter`` noisy copies; noise std = noise_level x each sample's value range; ``seed``
    seeds the noise's own generator."""
    return _run(model, x, target, composite, canonizers, "smoothgrad", params, noise_level=noise_level,
                n_iter=n_iter, seed=seed, memory_budget=memory_budget)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
                         canonizers: Sequence[Any] | None = None, *, baseline: torch.Tensor | float | None = None,
                         n_iter: int = 20, memory_budget: int = DEFAULT_BUDGET, **params: Any) -> Result:
    """(x - baseline) times the mean signal at the midpoints of ``n_iter`` steps from the baseline to x."""
    return _run(model, x, target, composite, canonizers, "integrated_gradients", params, baseline=baseline,
                n_iter=n_iter, memory_budget=memory_budget)


def occlusion(model: nn.Module, x: torch.Tensor, target: Target = None, composite: Any = None,
              canonizers: Sequence[Any] | None = None, *, window: int | Sequence[int] = 8,
              stride: int | Sequence[int] | None = None, fill: float = 0.0,
              memory_budget: int = DEFAULT_BUDGET) -> Result:
    """Drop in the target score when a window of the input (all channels) is set to ``fill``, averaged over
    the windows covering each position. Needs no backward; a composite is accepted but has no effect."""
    del composite, canonizers
    result = Explainer(model, method="occlusion", target=target, window=window, stride=stride, fill=fill,
                       memory_budget=memory_budget)(x)
    return result.output, result.relevance


ATTRIBUTORS: dict[str, Callable[..., Result]] = {
    "gradient": gradient,
    "input_x_gradient": input_x_gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
}
