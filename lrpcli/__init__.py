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
    "attribute": ("api", "attribute"),
    "export": ("export_program", "export"),
    "initial_relevance": ("api", "initial_relevance"),
    "Session": ("hooks", "Session"),
    "UnhandledModuleWarning": ("hooks", "UnhandledModuleWarning"),
    "rules_off": ("hooks", "rules_off"),
    "Recorder": ("recorder", "Recorder"),
    "Sum": ("modules", "Sum"),
    "Gate": ("modules", "Gate"),
    "Stabilizer": ("rules", "Stabilizer"),
    "keep_freed_memory": ("allocator", "keep_freed_memory"),
    "open_results": ("store", "open_results"),
}
_SUBMODULES = ("attributors", "canonizers", "composites", "hooks", "recorder", "rules", "store")

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'lrpcli' has no attribute {name!r}")
    globals()[name] = value
    return value
