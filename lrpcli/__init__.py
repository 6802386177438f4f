"""lrpcli: Layer-wise Relevance Propagation for PyTorch models, as a library and a batch command line tool.

    import lrpcli
    relevance = lrpcli.attribute(model, x, target, composite="epsilon_gamma_box", canonizers=["vgg"])

The engine (and torch) is imported on first use, so ``lrpcli render`` and ``lrpcli --help`` start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "attribute": ("explainer.api", "attribute"),
    "export": ("explainer.export_program", "export"),
    "initial_relevance": ("explainer.api", "initial_relevance"),
    "Session": ("engine.hooks", "Session"),
    "UnhandledModuleWarning": ("engine.hooks", "UnhandledModuleWarning"),
    "rules_off": ("engine.hooks", "rules_off"),
    "Recorder": ("engine.recorder", "Recorder"),
    "Sum": ("engine.modules", "Sum"),
    "Gate": ("engine.modules", "Gate"),
    "Stabilizer": ("engine.rules", "Stabilizer"),
    "keep_freed_memory": ("explainer.allocator", "keep_freed_memory"),
    "open_results": ("store", "open_results"),
}
# the engine's and explainer's public modules under short names: ``lrpcli.rules.plain()``, ``lrpcli.composites``
_SUBMODULES = {"attributors": "explainer.attributors", "canonizers": "engine.canonizers",
               "composites": "engine.composites", "hooks": "engine.hooks", "recorder": "engine.recorder",
               "rules": "engine.rules", "store": "store"}

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    else:
        raise AttributeError(f"module 'lrpcli' has no attribute {name!r}")
    globals()[name] = value
    return value
