"""The one-call API: ``lrpcli.attribute``, relevance for a batch through one ``Explainer``.

``initial_relevance``, ``resolve_composite`` and ``resolve_overrides`` live in ``lrpcli.explainer.explainer`` and are
re-exported here, where the package and older callers find them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrpcli.engine.composites import Composite
from lrpcli.engine.recorder import Recorder
from lrpcli.explainer.explainer import Explainer, Target, initial_relevance, resolve_composite, resolve_overrides

__all__ = ["Target", "attribute", "initial_relevance", "resolve_composite", "resolve_overrides"]


def attribute(model: nn.Module, x: torch.Tensor, target: Target = None,
              composite: str | Composite | None = "epsilon_gamma_box", canonizers: Sequence[Any] | None = None, *,
              epsilon: float | None = None, gamma: float | None = None, low: Any = None, high: Any = None,
              stabilizer: Any = None, zero_params: Sequence[str] | None = None, maxpool: str | None = None,
              overrides: Sequence[tuple[Any, Any]] | None = None, strict: bool | None = None,
              return_output: bool = False, create_graph: bool = False,
              layers: Sequence[str] | None = None, **params: Any) -> Any:
    """Relevance of ``x`` for ``target`` under an LRP composite; see README 'Python API'.

    Returns the relevance (shaped like x); with ``return_output`` also the model output first; with ``layers``
    (module-name globs) additionally a dict of the relevance at each matching module's output, last.
    Further keyword ``params`` go to the composite (e.g. ``beta`` of beta_smooth).
    ``composite=None`` gives the plain gradient. ``create_graph=True`` returns a relevance that can be
    differentiated with respect to x and the parameters (the rules are off for that second backward).
    """
    comp = resolve_composite(composite, epsilon=epsilon, gamma=gamma, low=low, high=high, stabilizer=stabilizer,
                             zero_params=zero_params, maxpool=maxpool, overrides=overrides, **params)
    if comp is None and (canonizers or layers):
        raise ValueError("canonizers and layers need a composite")
    recorder = Recorder(layers, keep_graph=create_graph) if layers else None
    explainer = Explainer(model, comp, canonizers, target=target, recorder=recorder, strict=strict,
                          create_graph=create_graph)
    with explainer:
        if layers:
            _check_patterns(explainer.model, layers)
        result = explainer(x)
    out: tuple = (result.relevance,)
    if return_output:
        out = (result.output,) + out
    if layers:
        out = out + (result.layers,)
    return out[0] if len(out) == 1 else out


def _check_patterns(model: nn.Module, patterns: Sequence[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = [n for n in names if pattern.split("*")[0] and n.startswith(pattern.split("*")[0][:3])][:5]
            raise ValueError(f"layers: no module matches {pattern!r}; modules are e.g. "
                             f"{', '.join(close or names[:5])}")
