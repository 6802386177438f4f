"""Composites by name (``get``, ``names``) and the building blocks to make new ones.

Names, descriptions and parameters come from the declarations in ``lrpcli.catalogue``; the builders in
``builtin`` are bound to them, so the config schema, this registry and the README table share one source.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from lrpcli.catalogue import COMPOSITES, PARAMS, declare
from lrpcli.engine.composites.base import Composite, FirstLayer, Glob, LayerMap, Mixture, NameMap
from lrpcli.engine.composites.builtin import BUILDERS, COMMON, basics


def names() -> list[str]:
    """The registered composite names."""
    return sorted(BUILDERS)


def parameters(name: str) -> tuple[str, ...]:
    """The keyword parameters composite ``name`` uses (besides canonizers, strict and overrides)."""
    return COMPOSITES[_check(name)].params


def describe(name: str) -> str:
    """The one-line description of composite ``name`` (README's composite table)."""
    return COMPOSITES[_check(name)].description


def _check(name: str) -> str:
    if name not in BUILDERS:
        close = difflib.get_close_matches(str(name).lower(), names(), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown composite {name!r}{hint} (valid composites: {', '.join(names())})")
    return name


def get(name: str, **params: Any) -> Composite:
    """Build a registered composite. Parameters it does not use raise ValueError (None means default)."""
    _check(name)
    given = {k: v for k, v in params.items() if v is not None}
    declared = COMPOSITES[name].params
    allowed = declared + COMMON
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"composite {name!r} does not use {', '.join(unknown)}; its parameters: {', '.join(allowed)}"
        )
    composite = BUILDERS[name](**_defaults(name, given), **given)
    composite.name = name
    return composite


def _defaults(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The declared defaults of the parameters not given that the builder has no default for itself."""
    signature = inspect.signature(BUILDERS[name]).parameters
    return {k: PARAMS[k].builder_default() for k in COMPOSITES[name].params
            if k in PARAMS and k not in given and k in signature and signature[k].default is inspect.Parameter.empty}


def register(name: str, builder: Callable[..., Composite], parameters: tuple[str, ...] = (),
             description: str = "") -> None:
    """Add a composite builder (a callable taking the named parameters plus canonizers/strict/overrides).

    A parameter declared in ``lrpcli.catalogue.PARAMS`` is validated in a config; one the builder has no default
    for gets the declared default when not given, others are passed only when given.
    """
    declare(name, description or name, tuple(parameters))
    BUILDERS[name] = builder


__all__ = ["Composite", "Glob", "LayerMap", "NameMap", "FirstLayer", "Mixture", "basics", "get", "names", "parameters",
           "describe", "register"]
