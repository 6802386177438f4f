"""Canonizers by name (``vgg``, ``resnet``, ``merge_batchnorm``, ``residual``, ``se_gates``, ...); lists compose."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from lrpcli.engine.canonizers.attention import Auto, MultiheadAttentionSteps
from lrpcli.engine.canonizers.base import Canonizer, Composed
from lrpcli.engine.canonizers.batchnorm import MergeBatchNorm
from lrpcli.engine.canonizers.densenet import DenseNetHead
from lrpcli.engine.canonizers.functional import FunctionalOperations
from lrpcli.engine.canonizers.gates import SqueezeExcitationGates
from lrpcli.engine.canonizers.residual import ResidualAdditions, TorchvisionResidualBlocks

_FACTORIES: dict[str, Callable[[], Canonizer]] = {}


def _builtin() -> None:
    _FACTORIES.update({
        "merge_batchnorm": MergeBatchNorm,
        "vgg": lambda: Composed("vgg", [MergeBatchNorm()]),
        "resnet": lambda: Composed("resnet", [MergeBatchNorm(), TorchvisionResidualBlocks()]),
        "residual": ResidualAdditions,
        "se_gates": SqueezeExcitationGates,
        "mobilenet": lambda: Composed("mobilenet", [MergeBatchNorm(), SqueezeExcitationGates(), ResidualAdditions()]),
        "efficientnet": lambda: Composed("efficientnet",
                                         [MergeBatchNorm(), SqueezeExcitationGates(), ResidualAdditions()]),
        "densenet": lambda: Composed("densenet", [MergeBatchNorm(), DenseNetHead()]),
        "attention": MultiheadAttentionSteps,
        "auto": Auto,
        "functional": FunctionalOperations,
        "transformer": lambda: Composed("transformer", [MergeBatchNorm(), MultiheadAttentionSteps(),
                                                        FunctionalOperations()]),
    })


def names() -> list[str]:
    """The canonizer names accepted in configs and by ``attribute(canonizers=[...])``."""
    if not _FACTORIES:
        _builtin()
    return sorted(_FACTORIES)


def make(spec: str | Canonizer) -> Canonizer:
    """A fresh canonizer from a name, or a copy of a canonizer object (each session needs its own state)."""
    if isinstance(spec, Canonizer):
        return copy.deepcopy(spec)
    if not isinstance(spec, str) or spec not in names():
        raise ValueError(f"unknown canonizer {spec!r}; valid canonizers: {', '.join(names())}")
    return _FACTORIES[spec]()


def make_all(specs: Sequence[Any] | None) -> list[Canonizer]:
    return [make(s) for s in (specs or [])]


def register(name: str, factory: Callable[[], Canonizer]) -> None:
    """Add a canonizer factory under a name."""
    names()
    _FACTORIES[name] = factory


__all__ = ["Canonizer", "Composed", "names", "make", "make_all", "register"]
